"""ZeRO stage 1 (train.zero: 1): AdamW with its moments, and the fp32 masters of a bf16 model,
sharded over the ranks, so each holds 1/world_size of the optimizer state.

The gradient buckets of the reducer are reduce-scattered: rank r receives the averaged gradient
of slice r of every bucket. The parameters' values are laid out the same way (`flat`), so the
rank's slices of its buckets are what it owns: an ordinary AdamW steps them, each slice of a
parameter as a one-dimensional parameter of its own (the same kernels, the CPU's fused update
or kernels/adamw.cu, with the clip norm's sum of squares summed over the ranks), and the updated
values are all-gathered back into every rank's parameters.

Checkpoints hold the whole state: `state_dict()` and `master_weights()` gather it, and the
loaders take their slices from whole arrays, so a run resumes on any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamac.dist.reducer import GradReducer
from llamac.engine import backend
from llamac.engine.tensor import Tensor
from llamac.errors import LlamacError
from llamac.train.optim import AdamW, decays


@dataclass
class Segment:
    name: str           # the parameter's
    param: int          # its index
    bucket: int
    lo: int             # [lo, hi): its positions in the bucket, within this rank's slice
    hi: int
    offset: int         # where the parameter starts in the bucket


def _over_ranks(group):
    """The clip's sum of squares summed over the ranks: in place on the fused kernel's partial
    sums, or a scalar."""
    def over_ranks(x):
        xp = backend.get_array_module(x)
        if isinstance(x, xp.ndarray) and x.ndim == 1:
            group.all_reduce(x).wait()
            return x
        buf = xp.asarray(x, np.float32).reshape(1).copy()
        group.all_reduce(buf).wait()
        return buf.reshape(())
    return over_ranks


class ShardedAdamW:
    def __init__(self, named_params, group, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 bucket_mb: float | None = None):
        self.params = list(named_params)
        self.group = group
        self.reducer = GradReducer([p for _, p in self.params], group, bucket_mb, shard=True)
        buckets = self.reducer.buckets
        xp = self.params[0][1].xp
        self.flat = [xp.zeros(b.padded, b.dtype) for b in buckets]     # the parameters' values
        self._fill_flat()
        self.segments = []
        for bi, b in enumerate(buckets):
            start, stop = group.rank * b.shard, (group.rank + 1) * b.shard
            for i, off, size in b.entries:
                lo, hi = max(off, start), min(off + size, stop)
                if lo < hi:
                    self.segments.append(Segment(self.params[i][0], i, bi, lo, hi, off))
        if not self.segments:
            raise LlamacError(f"train.zero: 1: rank {group.rank} of {group.world_size} holds no parameter slice "
                              "(the model is too small to shard over this many ranks): use train.zero: 0")
        self.views = []         # per segment: (its values in flat, its reduced gradient)
        named = []
        for s in self.segments:
            start = group.rank * buckets[s.bucket].shard
            value = self.flat[s.bucket][s.lo:s.hi]
            slot = Tensor(value, requires_grad=True)
            slot.grad = self.reducer.shards[s.bucket][s.lo - start:s.hi - start]
            self.views.append((value, slot))
            named.append((s.name, slot))
        decay = {s.name: decays(s.name, self.params[s.param][1]) for s in self.segments}
        self.inner = AdamW(named, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           decay_names=decay, sumsq_over_ranks=_over_ranks(group))

    @property
    def t(self) -> int:
        return self.inner.t

    @t.setter
    def t(self, value: int):
        self.inner.t = value

    def _fill_flat(self):
        for bi, b in enumerate(self.reducer.buckets):
            for i, off, size in b.entries:
                self.flat[bi][off:off + size] = self.params[i][1].data.reshape(-1)

    # ------------------------------------------------------------ the step
    def step(self, lr: float | None = None, clip: float | None = None):
        norm = self.inner.step(lr=lr, clip=clip)
        self._rebind()
        self._gather()
        return norm

    def _rebind(self):
        """AdamW may replace a slice's array (a bf16 slice rewritten from its master): back into flat."""
        xp = self.params[0][1].xp
        for value, slot in self.views:
            if slot.data is not value:
                xp.copyto(value, slot.data)
                slot.data = value

    def _gather(self):
        """Every rank's updated slices into every rank's parameters (in place: the addresses stay)."""
        works = [self.group.all_gather(f) for f in self.flat]
        xp = self.params[0][1].xp
        for bi, (b, work) in enumerate(zip(self.reducer.buckets, works)):
            work.wait()
            for i, off, size in b.entries:
                p = self.params[i][1]
                xp.copyto(p.data, self.flat[bi][off:off + size].reshape(p.shape))

    def graph_update(self):
        inner = self.inner.graph_update()
        return None if inner is None else _ShardedGraphUpdate(self, inner)

    def zero_grad(self):
        for _, p in self.params:
            p.grad = None

    # ------------------------------------------------------------ whole state, for checkpoints
    def _gathered(self, local) -> dict:
        """name -> the whole fp32 array on the host, on every rank; local(k) is segment k's values."""
        xp = self.params[0][1].xp
        out = {}
        for bi, b in enumerate(self.reducer.buckets):
            buf = xp.zeros(b.padded, np.float32)
            for k, s in enumerate(self.segments):
                if s.bucket == bi:
                    buf[s.lo:s.hi] = local(k)
            self.group.all_gather(buf).wait()
            host = backend.to_numpy(buf)
            for i, off, size in b.entries:
                name, p = self.params[i]
                out[name] = host[off:off + size].reshape(p.shape).copy()
        return out

    def master_weights(self) -> dict:
        """The full-precision weights, whole, on every rank (a collective: every rank calls it)."""
        masters = self.inner.master
        return self._gathered(lambda k: masters.get(self.segments[k].name, self.views[k][1].data))

    def state_dict(self) -> dict:
        """The moments, whole (a collective)."""
        m = self._gathered(lambda k: self.inner.m[self.segments[k].name])
        v = self._gathered(lambda k: self.inner.v[self.segments[k].name])
        return {**{f"m.{n}": a for n, a in m.items()}, **{f"v.{n}": a for n, a in v.items()}}

    def _slice(self, whole, s: Segment):
        flat = np.asarray(whole, np.float32).reshape(-1)[s.lo - s.offset:s.hi - s.offset]
        return backend.to_device(np.ascontiguousarray(flat), self.params[0][1].device)

    def load_master_weights(self, weights: dict):
        """After the model's weights were loaded: this rank's slices of the masters and values."""
        self._fill_flat()
        for s in self.segments:
            if s.name in self.inner.master:
                self.inner.master[s.name][...] = self._slice(weights[s.name], s)

    def load_state_dict(self, state: dict, t: int):
        for s in self.segments:
            self.inner.m[s.name][...] = self._slice(state[f"m.{s.name}"], s)
            self.inner.v[s.name][...] = self._slice(state[f"v.{s.name}"], s)
        self.inner.t = t


class _ShardedGraphUpdate:
    """The sharded step inside the CUDA graph: AdamW's recorded kernels on this rank's slices,
    then the all-gather into the parameters."""

    def __init__(self, opt: ShardedAdamW, inner):
        self.opt, self.inner = opt, inner
        self.norm = inner.norm

    def record(self) -> bool:
        if not self.inner.record():
            return False
        self.opt._gather()
        return True

    def bind(self):
        self.inner.bind()

    def prepare(self, lr: float, clip):
        self.inner.prepare(lr, clip)
