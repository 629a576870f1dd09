"""Training: the loop (loop), AdamW and the schedule (optim), checkpoints (checkpoint), chat tuning (sft)."""
