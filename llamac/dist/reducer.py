"""Gradients averaged over the ranks in buckets, each reduced as soon as the backward has
finished every gradient in it (overlap), as PyTorch's DDP does.

The parameters are laid out, in reverse order (the backward reaches the last layers first), in
flat buckets of about LLAMAC_DP_BUCKET_MB, one dtype each, padded to a multiple of the world
size. In the last micro-batch's backward, engine.tensor.grad_ready reports each parameter whose
gradient is final; it is copied (times 1/world_size) into its bucket, and a bucket whose every
gradient has arrived is reduced, in bucket order so that all ranks issue the same collectives in
the same order. `finish()` reduces what is left and waits; then each .grad is a view into its
reduced bucket (all_reduce), or, for ZeRO-1 (shard=True), each rank holds only its reduced slice
of every bucket (reduce_scatter) in `shards`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from llamac import runtime
from llamac.engine.tensor import grad_ready


@dataclass
class Bucket:
    dtype: np.dtype
    entries: list = field(default_factory=list)     # (parameter index, offset, size)
    numel: int = 0
    padded: int = 0
    shard: int = 0                                  # padded // world_size: one rank's slice


def plan_buckets(params, world_size: int, bucket_bytes: float) -> list:
    """Buckets of the parameters (reverse order, about bucket_bytes each, one dtype each)."""
    buckets, open_by_dtype = [], {}
    for i in reversed(range(len(params))):
        p = params[i]
        dtype = np.dtype(p.dtype)
        b = open_by_dtype.get(dtype)
        if b is None or b.numel * dtype.itemsize >= bucket_bytes:
            b = open_by_dtype[dtype] = Bucket(dtype)
            buckets.append(b)
        b.entries.append((i, b.numel, int(p.size)))
        b.numel += int(p.size)
    for b in buckets:
        b.padded = -(-b.numel // world_size) * world_size
        b.shard = b.padded // world_size
    return buckets


class GradReducer:
    def __init__(self, params, group, bucket_mb: float | None = None, shard: bool = False):
        self.params, self.group, self.shard = list(params), group, shard
        mb = runtime.options().dp_bucket_mb if bucket_mb is None else bucket_mb
        self.buckets = plan_buckets(self.params, group.world_size, mb * 2**20)
        xp = self.params[0].xp
        self.flat = [xp.zeros(b.padded, b.dtype) for b in self.buckets]
        self.shards = [xp.zeros(b.shard, b.dtype) for b in self.buckets] if shard else None
        self.where = {}         # id(param) -> (parameter index, bucket index, offset, size)
        for bi, b in enumerate(self.buckets):
            for i, off, size in b.entries:
                self.where[id(self.params[i])] = (i, bi, off, size)
        self.views = [None] * len(self.params)
        for i, bi, off, size in self.where.values():
            self.views[i] = self.flat[bi][off:off + size].reshape(self.params[i].shape)
        self.scale = 1.0 / group.world_size
        self._reset()

    def _reset(self):
        self.arrived = [0] * len(self.buckets)
        self.filled = [False] * len(self.params)
        self.works = [None] * len(self.buckets)
        self.next = 0

    @contextlib.contextmanager
    def reducing(self):
        """Around the backward of a step's last micro-batch: buckets are reduced as they fill."""
        self._reset()
        with grad_ready(self._ready):
            yield

    def _ready(self, tensor):
        where = self.where.get(id(tensor))
        if where is None or tensor.grad is None:
            return
        i, bi, off, size = where
        if self.filled[i]:
            return
        xp = tensor.xp
        dst, g = self.flat[bi][off:off + size], tensor.grad.reshape(-1)
        if self.scale == 1.0:
            xp.copyto(dst, g, casting="unsafe")
        else:
            xp.multiply(g, self.scale, out=dst, casting="unsafe")
        self.filled[i] = True
        self.arrived[bi] += 1
        self._launch()
        self.group.progress()

    def _launch(self, everything: bool = False):
        while self.next < len(self.buckets):
            bi, b = self.next, self.buckets[self.next]
            if self.arrived[bi] < len(b.entries):
                if not everything:
                    return
                for i, off, size in b.entries:     # no gradient here this step: it adds nothing
                    if not self.filled[i]:
                        self.flat[bi][off:off + size] = 0
            send = self.flat[bi]
            self.works[bi] = (self.group.reduce_scatter(send, self.shards[bi]) if self.shard
                              else self.group.all_reduce(send))
            self.next += 1

    def finish(self):
        """Reduce the buckets not yet sent and order what follows after every reduction."""
        self._launch(everything=True)
        for work in self.works:
            work.wait()
        if not self.shard:
            self.bind_grads()

    def bind_grads(self):
        """Each parameter's .grad: its averaged gradient, a view into its bucket."""
        if not self.shard:
            for p, view in zip(self.params, self.views):
                p.grad = view
