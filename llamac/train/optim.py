"""AdamW with decoupled weight decay, global-norm clipping and the warm-up + cosine schedule."""
from __future__ import annotations

import math

import numpy as np

from llamac.config import TrainConfig
from llamac.engine import backend, cpu
from llamac.errors import LlamacError
from llamac.ops import common

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"adamw": ("adamw_sumsq", "adamw_finalize", "adamw_update")}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def decays(name: str, param) -> bool:
    """Weight decay on matrices only: never on norm gains, biases or the token embedding."""
    return param.ndim >= 2 and not name.startswith("tok_embeddings")


class AdamW:
    """State (m, v) in fp32 beside fp32 master weights; `step` may be called with a clip."""

    def __init__(self, named_params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 decay_names=None, sumsq_over_ranks=None):
        self.params = list(named_params)                     # [(name, Parameter)]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        # ZeRO-1 (llamac.dist.zero) steps slices of parameters: which of them decay is given by name,
        # and the clip's sum of squares is summed over the ranks' slices before its square root.
        self.decay_names, self.sumsq_over_ranks = decay_names, sumsq_over_ranks
        self.m = {n: p.xp.zeros(p.shape, np.float32) for n, p in self.params}
        self.v = {n: p.xp.zeros(p.shape, np.float32) for n, p in self.params}
        # Mixed precision: bf16/fp16 parameters are what the model computes with; the optimizer
        # updates fp32 master copies and rounds them back after every step.
        self.master = {n: p.data.astype(np.float32) for n, p in self.params if backend.is_low_precision(p.dtype)}
        self.t = 0
        self._fused = None                                   # FusedAdamW, made on the first GPU step

    def grad_norm(self):
        """Global L2 norm of all gradients, as a device scalar (no host sync)."""
        total = None
        reduce = self.sumsq_over_ranks
        if self.params[0][1].xp is np:                      # BLAS dot: no (n,) temporary per parameter
            sq = [np.dot(g.ravel(), g.ravel()) for g in (p.grad.astype(np.float32, copy=False)
                                                         for _, p in self.params if p.grad is not None)]
            if reduce is not None:
                return np.sqrt(reduce(np.float32(sum(sq))))
            return np.sqrt(np.float32(sum(sq))) if sq else np.float32(0.0)
        for _, p in self.params:
            if p.grad is not None:
                g = p.grad.astype(np.float32, copy=False)
                sq = (g * g).sum()
                total = sq if total is None else total + sq
        xp = self.params[0][1].xp
        if reduce is not None:
            return xp.sqrt(reduce(total if total is not None else xp.float32(0.0)))
        return xp.sqrt(total) if total is not None else xp.float32(0.0)

    def decays(self, name: str, param) -> bool:
        return self.decay_names[name] if self.decay_names is not None else decays(name, param)

    def step(self, lr: float | None = None, clip: float | None = None):
        """One update; returns the pre-clip gradient norm (a device scalar)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        if self.params and self.params[0][1].xp is not np and self._fusable():
            return self._fused_step(lr, clip)
        norm = self.grad_norm()
        scale = 1.0
        if clip:
            xp = self.params[0][1].xp
            scale = xp.minimum(xp.float32(1.0), xp.float32(clip) / (norm + 1e-6)).astype(np.float32)
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        step_size = lr / bias1
        if self.params[0][1].xp is np:
            _cpu_update(self, lr, scale, bias2, step_size)
            return norm
        for name, p in self.params:
            if p.grad is None:
                continue
            g = p.grad.astype(np.float32, copy=False) * scale
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            xp = p.xp
            update = m / (xp.sqrt(v / bias2) + self.eps)
            master = self.master.get(name, p.data)
            if self.weight_decay and self.decays(name, p):
                master *= (1 - lr * self.weight_decay)
            master -= step_size * update
            if name in self.master:
                p.data = master.astype(p.data.dtype)
        return norm

    def _fusable(self) -> bool:
        """GPU, one kernel dtype for every parameter, contiguous parameters: the multi-tensor kernels apply."""
        dtype = self.params[0][1].dtype
        return dtype in backend.CUDA_TYPES and all(p.dtype == dtype and p.data.flags.c_contiguous
                                                   for _, p in self.params)

    def _fused_step(self, lr, clip):
        """kernels/adamw.cu: every parameter in three launches, no host sync; bf16/fp16 parameters
        are rewritten in place from their fp32 masters (their addresses never change)."""
        if self._fused is None:
            self._fused = self._new_fused()
        b1, b2 = self.betas
        entries, keep = [], []
        for name, p in self.params:
            g = p.grad
            if g is not None and (g.dtype != p.dtype or not g.flags.c_contiguous or g.shape != p.shape):
                g = p.xp.ascontiguousarray(g.reshape(p.shape), dtype=p.dtype)   # e.g. a broadcast view
                keep.append(g)
            entries.append((p.data, g, self.master.get(name, p.data), self.m[name], self.v[name],
                            bool(self.weight_decay) and self.decays(name, p)))
        return self._fused.step(entries, lr=lr, step_size=lr / (1 - b1 ** self.t), inv_bias2=1 / (1 - b2 ** self.t),
                                clip=clip, weight_decay=self.weight_decay, beta1=b1, beta2=b2, eps=self.eps)

    def _new_fused(self) -> "FusedAdamW":
        sizes, dtype = [p.size for _, p in self.params], self.params[0][1].dtype
        if self.sumsq_over_ranks is None:
            return FusedAdamW(sizes, dtype)
        # the partial sums are added over the ranks element by element: every rank needs as many
        return FusedAdamW(sizes, dtype, sumsq_grid=RANK_SUMSQ_GRID, reduce_partials=self.sumsq_over_ranks)

    def graph_update(self):
        """A GraphUpdate that records this optimizer's step into a CUDA graph after the backward, or
        None where the multi-tensor kernels do not apply (CPU, mixed dtypes)."""
        if not (self.params and self.params[0][1].xp is not np and self._fusable()):
            return None
        return GraphUpdate(self)

    def zero_grad(self):
        for _, p in self.params:
            p.grad = None

    def master_weights(self) -> dict:
        """The full-precision weights (fp32 masters where the model computes in bf16/fp16)."""
        return {n: self.master.get(n, p.data) for n, p in self.params}

    def load_master_weights(self, weights: dict):
        for n in self.master:
            self.master[n] = backend.to_device(np.asarray(weights[n], np.float32), self.params[0][1].device)

    def state_dict(self) -> dict:
        out = {f"m.{n}": backend.to_numpy(a) for n, a in self.m.items()}
        out.update({f"v.{n}": backend.to_numpy(a) for n, a in self.v.items()})
        return out

    def load_state_dict(self, state: dict, t: int):
        for n, p in self.params:
            self.m[n] = backend.to_device(np.asarray(state[f"m.{n}"], np.float32), p.device)
            self.v[n] = backend.to_device(np.asarray(state[f"v.{n}"], np.float32), p.device)
        self.t = t


class GraphUpdate:
    """AdamW's fused step inside a CUDA graph (llamac.train.loop.TrainStep): its own FusedAdamW,
    whose pointer table is uploaded once (the gradients sit at fixed addresses in the graph's pool)
    and whose per-step scalars (lr, bias corrections, clip) the host writes with one 64-byte copy
    before each replay. The pre-clip norm lands in `norm`, a fixed device scalar."""

    def __init__(self, opt: AdamW):
        self.opt = opt
        first = opt.params[0][1]
        self.fused = opt._new_fused()
        self.norm = first.xp.zeros((), np.float32)
        self.entries = None

    def record(self) -> bool:
        """Call while capturing, after the backward: records the three kernels against the current
        gradients. False (nothing recorded) when a gradient is not a contiguous array of its
        parameter's dtype and shape (the eager step then converts it)."""
        opt = self.opt
        entries = []
        for name, p in opt.params:
            g = p.grad
            if g is not None and (g.dtype != p.dtype or not g.flags.c_contiguous or g.shape != p.shape):
                return False
            entries.append((p.data, g, opt.master.get(name, p.data), opt.m[name], opt.v[name],
                            bool(opt.weight_decay) and opt.decays(name, p)))
        self.fused.launch(self.norm)
        self.entries = entries
        return True

    def bind(self):
        """After the capture: the table the recorded kernels read (before the first replay)."""
        self.fused.set_table(self.entries)

    def prepare(self, lr: float, clip: float | None):
        """Before each replay: the step count and this step's scalars."""
        opt = self.opt
        opt.t += 1
        b1, b2 = opt.betas
        self.fused.set_scalars(lr, lr / (1 - b1 ** opt.t), 1 / (1 - b2 ** opt.t), clip, opt.weight_decay, b1, b2,
                               opt.eps)


def _cpu_update(opt, lr, scale, bias2, step_size):
    """The same update on the CPU, fused: every parameter cut into chunks that fit the L2 cache,
    each chunk updated in place through one scratch buffer, the chunks split over the cores."""
    b1, b2 = opt.betas
    chunks, flat = [], {}                               # (name, param, start, stop) over flat views
    for name, p in opt.params:
        if p.grad is not None:
            if name not in opt.master and not p.data.flags.c_contiguous:
                p.data = np.ascontiguousarray(p.data)   # updated in place through a flat view
            flat[name] = (p.grad.astype(np.float32, copy=False).reshape(-1),
                          opt.master.get(name, p.data).reshape(-1))
            chunks += [(name, p, i, min(i + _CHUNK, p.size)) for i in range(0, p.size, _CHUNK)]

    # m / (sqrt(v / bias2) + eps) * step_size == m / (sqrt(v) + eps sqrt(bias2)) * step_size sqrt(bias2),
    # and the clip scale folds into the moment coefficients: 13 passes over each chunk.
    root2 = math.sqrt(bias2)
    c1, c2 = (1 - b1) * float(scale), (1 - b2) * float(scale) ** 2
    eps2, step2 = opt.eps * root2, step_size * root2
    decay = 1 - lr * opt.weight_decay

    def run(a, b):
        tmp = np.empty(_CHUNK, np.float32)
        for name, p, i, j in chunks[a:b]:
            g, master = flat[name][0][i:j], flat[name][1][i:j]
            m, v = opt.m[name].reshape(-1)[i:j], opt.v[name].reshape(-1)[i:j]
            t = tmp[:j - i]
            np.multiply(g, c1, out=t)
            m *= b1
            m += t
            np.multiply(g, g, out=t)
            t *= c2
            v *= b2
            v += t
            np.sqrt(v, out=t)
            t += eps2
            np.divide(m, t, out=t)
            if opt.weight_decay and opt.decays(name, p):
                master *= decay
            t *= step2
            master -= t

    cpu.for_row_blocks(run, len(chunks), sum(j - i for _, _, i, j in chunks))
    for name, p in opt.params:
        if name in opt.master and p.grad is not None:
            p.data = opt.master[name].astype(p.data.dtype)


_CHUNK = 1 << 15


# ---------------------------------------------------------------- the GPU step: kernels/adamw.cu
# The reference is AdamW's xp path above (the same formulas); AdamW._fused_step and GraphUpdate launch it.

ADAMW_CHUNK = 16384          # must equal ADAMW_CHUNK in kernels/adamw.cu
ADAMW_TABLE = 7              # 64-bit words per tensor in the table (param, grad, master, m, v, size, decays)
ADAMW_SCALARS = 16           # fp32 slots after the table: 0-7 host-written, 8-9 device-written
RANK_SUMSQ_GRID = 512        # partial sums per rank when the norm is summed over ranks (ZeRO-1)


class FusedAdamW:
    """The launches for one fixed list of tensor sizes: sum of squares, clip factor, update.

    `step` uploads the pointer table and the step's scalars in ONE host-to-device copy (async, no
    sync), then runs three kernels that read everything else from device memory, so the three
    launches (`launch`) can be captured in a CUDA graph once the table no longer changes.
    """

    def __init__(self, sizes, dtype, sumsq_grid: int | None = None, reduce_partials=None):
        cp = backend.cupy_module()
        self.reduce_partials = reduce_partials    # partial sums -> summed over the ranks, in place
        self.dtype = np.dtype(dtype)
        if self.dtype not in backend.CUDA_TYPES:
            raise LlamacError(f"FusedAdamW: the CUDA kernel takes float32, bfloat16 or float16, got {self.dtype}")
        self.sizes = [int(n) for n in sizes]
        n = len(self.sizes)
        tensor_of, start = [], []
        for i, size in enumerate(self.sizes):
            for lo in range(0, size, ADAMW_CHUNK):
                tensor_of.append(i)
                start.append(lo)
        self.n_chunks = len(start)
        self.chunk_tensor = cp.asarray(np.array(tensor_of, np.int32))
        self.chunk_start = cp.asarray(np.array(start, np.int64))
        words = n * ADAMW_TABLE + ADAMW_SCALARS // 2
        self.host = np.zeros(words, np.uint64)                   # table, then 16 fp32 scalars
        self.host_table = self.host[: n * ADAMW_TABLE].reshape(n, ADAMW_TABLE)
        self.host_scalars = self.host[n * ADAMW_TABLE:].view(np.float32)
        self.device = cp.zeros(words, np.uint64)
        self.table = self.device[: n * ADAMW_TABLE]
        self.scalars = self.device[n * ADAMW_TABLE:].view(np.float32)
        sms = common.sm_count()
        self.sumsq_grid = sumsq_grid or max(1, min(self.n_chunks, sms * 4))   # fixed: the norm's summation order
        self.update_grid = max(1, min(self.n_chunks, sms * 8))
        self.partial = cp.empty(self.sumsq_grid, np.float32)
        self._fns = [backend.get_kernel("adamw", f, self.dtype) for f in SOURCES["adamw"]]

    def step(self, entries, lr, step_size, inv_bias2, clip, weight_decay, beta1, beta2, eps):
        """entries: per tensor (param, grad or None, fp32 master (the param itself if fp32), m, v, decays).

        Returns the pre-clip global gradient norm as a fresh 0-d fp32 device array.
        """
        self._fill_table(entries)
        self.host_scalars[:8] = (lr, step_size, inv_bias2, clip or 0.0, weight_decay, beta1, beta2, eps)
        cp = backend.cupy_module()
        self.device.set(self.host, stream=cp.cuda.get_current_stream())
        norm = cp.empty((), np.float32)
        self.launch(norm)
        return norm

    def _fill_table(self, entries):
        rows = self.host_table
        for i, (p, g, master, m, v, decay) in enumerate(entries):
            rows[i] = (p.data.ptr, 0 if g is None else g.data.ptr, master.data.ptr, m.data.ptr, v.data.ptr,
                       self.sizes[i], 1 if decay else 0)

    def set_table(self, entries):
        """Upload the pointer table once (entries as in `step`) for `launch`es captured in a graph."""
        self._fill_table(entries)
        cp = backend.cupy_module()
        self.device.set(self.host, stream=cp.cuda.get_current_stream())

    def set_scalars(self, lr, step_size, inv_bias2, clip, weight_decay, beta1, beta2, eps):
        """The step's scalars alone (64 bytes, one async host-to-device copy on the current stream):
        what a graph replaying `launch` reads from device memory."""
        self.host_scalars[:8] = (lr, step_size, inv_bias2, clip or 0.0, weight_decay, beta1, beta2, eps)
        cp = backend.cupy_module()
        n = len(self.sizes) * ADAMW_TABLE
        self.device[n:n + 4].set(self.host[n:n + 4], stream=cp.cuda.get_current_stream())

    def launch(self, norm_out):
        """The three kernels alone (graph-capturable): norm_out gets the pre-clip norm."""
        sumsq, finalize, update = self._fns
        n = np.int32(self.n_chunks)
        threads = (common.THREADS,)
        sumsq((self.sumsq_grid,), threads, (self.table, self.chunk_tensor, self.chunk_start, n, self.partial))
        if self.reduce_partials is not None:
            self.reduce_partials(self.partial)
        finalize((1,), (1024,), (self.partial, np.int32(self.sumsq_grid), self.scalars, norm_out))
        update((self.update_grid,), threads, (self.table, self.chunk_tensor, self.chunk_start, n, self.scalars))
