"""Text in, token shards out: sources, the shard format, the batch loader and the pipeline that ties them."""
