"""Cross-entropy: the Function, the NumPy reference and the kernels (kernels/cross_entropy.cu), and the
LM head + loss in one Function (HeadLoss).

The LM head and its cross-entropy in one Function: logits only ever exist a row chunk at a time.

The plain path keeps a (B*T, V) logits array from the forward until the backward has read its
gradient: 2.1 GB in bf16 for 32k rows of a 32k vocabulary, the largest array of a training step.
Here the forward walks the rows in chunks: logits of the chunk (one GEMM), its loss and
log-sum-exp (kernels/cross_entropy.cu), the logits' gradient written over them, then the chunk's
input gradient (dX = dlogits @ W) and its share of the weight gradient (dW += dlogits.T @ X, summed
in fp32 across chunks) before the next chunk reuses the buffer. The gradients are made in the
forward (the loss is the graph's end, so the gradient reaching it is a scalar known to scale them);
the backward only multiplies by that scalar. Same FLOPs as the plain path, one chunk of logits in
memory instead of all of them.

Written once with `xp`: on the CPU (NumPy) the same chunks run through the reference cross-entropy,
which is what the tests compare with the plain Linear + CrossEntropy in float64."""
from __future__ import annotations

import numpy as np

from llamac import runtime
from llamac.engine import backend, cpu
from llamac.engine.matmul import matmul
from llamac.engine.ops import compute_dtype
from llamac.engine.tensor import Function, Tensor, grad_enabled
from llamac.errors import LlamacError, ShapeError
from llamac.ops.common import _cuda_dtype, _fill_out, _on_gpu, sm_count

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"cross_entropy": ("cross_entropy_forward", "cross_entropy_backward")}

# ---------------------------------------------------------------- cross-entropy
# Per-row loss = lse - logit[target] (0 where target == ignore_index) and its gradient
# (softmax - onehot) * scale, with no fp32 (N, V) array. Kernel: kernels/cross_entropy.cu.

CE_THREADS = 512


def cross_entropy_forward_reference(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)) in fp32 (fp64 for fp64 logits); loss 0 on ignored rows."""
    xp = backend.get_array_module(logits)
    ct = compute_dtype(logits.dtype)
    x = logits.reshape(-1, logits.shape[-1]).astype(ct, copy=False)
    t = targets.reshape(-1)
    valid = t != ignore_index
    safe = xp.where(valid, t, 0)
    m = x.max(axis=-1)
    lse = m + xp.log(xp.exp(x - m[:, None]).sum(axis=-1))
    picked = xp.take_along_axis(x, safe[:, None], axis=-1)[:, 0]
    return xp.where(valid, lse - picked, 0).astype(ct, copy=False), lse


def cross_entropy_backward_reference(logits, targets, lse, scale, ignore_index=-100):
    """dlogits = (softmax - onehot(target)) * scale in logits' dtype; zero rows where ignored."""
    xp = backend.get_array_module(logits)
    ct = compute_dtype(logits.dtype)
    V = logits.shape[-1]
    x = logits.reshape(-1, V).astype(ct, copy=False)
    t = targets.reshape(-1)
    valid = t != ignore_index
    grad = xp.exp(x - lse.reshape(-1, 1).astype(ct, copy=False))
    grad[xp.arange(len(t)), xp.where(valid, t, 0)] -= 1
    grad *= (valid[:, None] * xp.asarray(scale, dtype=ct).reshape(()))
    return grad.astype(logits.dtype, copy=False).reshape(logits.shape)


def _ce_operands(op, logits, targets):
    xp = _on_gpu(op, logits=logits, targets=targets)
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ShapeError(f"{op}: logits {logits.shape} and targets {targets.shape} do not fit "
                         "(targets must be logits' shape without the last axis)")
    if targets.dtype.kind not in "iu":
        raise LlamacError(f"{op}: targets must be integers, got {targets.dtype}")
    return xp


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)), both fp32: per-row -log softmax(logits)[target] and log-sum-exp.

    logits (..., V) in float32/bfloat16/float16, targets (...) integers; N rows. The kernel reads
    the logits once (online max and sum); ignored rows (and targets outside [0, V)) give loss 0.
    """
    xp = _ce_operands("cross_entropy_forward", logits, targets)
    if xp is np:
        return cross_entropy_forward_reference(logits, targets, ignore_index)
    dtype = _cuda_dtype("cross_entropy_forward", logits)
    V = logits.shape[-1]
    x2 = xp.ascontiguousarray(logits).reshape(-1, V)
    t = xp.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    N = x2.shape[0]
    loss, lse = xp.empty(N, np.float32), xp.empty(N, np.float32)
    if N and V:
        with x2.device:
            fn = backend.get_kernel("cross_entropy", "cross_entropy_forward", dtype)
            grid = min(N, sm_count() * 4)
            fn((grid,), (CE_THREADS,), (x2, t, lse, loss, np.int64(N), np.int32(V), np.int64(ignore_index)))
    return loss, lse


def cross_entropy_backward(logits, targets, lse, scale, ignore_index=-100, out=None):
    """dlogits = (softmax(logits) - onehot(targets)) * scale, in the logits' dtype and shape.

    scale: a number or a 1-element fp32 device array (g / count, read on the device: no sync).
    out may be `logits` itself (the gradient overwrites the logits in place) or None (allocated).
    """
    xp = _ce_operands("cross_entropy_backward", logits, targets)
    if xp is np:
        got = cross_entropy_backward_reference(logits, targets, lse, scale, ignore_index)
        return _fill_out(out, got)
    dtype = _cuda_dtype("cross_entropy_backward", logits)
    V = logits.shape[-1]
    x2 = xp.ascontiguousarray(logits).reshape(-1, V)
    t = xp.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    N = x2.shape[0]
    if lse.size != N:
        raise ShapeError(f"cross_entropy_backward: lse has {lse.size} rows, logits {N}")
    lse = xp.ascontiguousarray(lse.reshape(-1), dtype=np.float32)
    scale = xp.asarray(scale, dtype=np.float32).reshape(1)
    if out is None:
        out = xp.empty(logits.shape, dtype)
    elif out.shape != logits.shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise LlamacError(f"cross_entropy_backward: out must be a C-contiguous {dtype} array of shape {logits.shape}")
    if N and V:
        with x2.device:
            fn = backend.get_kernel("cross_entropy", "cross_entropy_backward", dtype)
            grid = min(N, sm_count() * 4)
            fn((grid,), (CE_THREADS,), (x2, t, lse, scale, out, np.int64(N), np.int32(V), np.int64(ignore_index)))
    return out

# Logits per chunk (runtime.options().head_loss_chunk_bytes, 1 GB): two chunks for 32k rows x 32k
# vocabulary in bf16. Every chunk after the first re-reads and re-writes the fp32 weight-gradient sum,
# so fewer, larger chunks are faster (BENCHMARKS.md).
# A frozen head's chunks: 256 MB of logits (1,046 rows of a 128k vocabulary in bf16, still a GEMM
# that fills the tensor cores) instead of 1 GB, when that chunk would be the step's largest array.
FROZEN_HEAD_CHUNK_BYTES = 1 << 28


def chunk_rows(V: int, itemsize: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: at least 128 (a GEMM that still fills the tensor cores)."""
    return max(128, (chunk_bytes or runtime.options().head_loss_chunk_bytes) // max(1, V * itemsize))


class HeadLoss(Function):
    """mean over valid rows of cross_entropy(x @ w.T, targets); x (..., C), w (V, C), targets (...).
    With `rows` (k, C) and `index` (k ids): logit column index[j] is x rows[j] instead (trainable token
    rows beside a frozen head, llamac.ops.lora.LinearWithRows); the rows' gradient is (k, C)."""

    def forward(self, x, w, targets, *rows, index=None, ignore_index=-100, need_x=True, need_w=True,
                need_rows=True, chunk_bytes=None):
        if x.shape[-1] != w.shape[1] or x.shape[:-1] != targets.shape:
            raise ShapeError(f"head_loss: input {x.shape}, weight {w.shape} and targets {targets.shape} do not fit")
        rows = rows[0] if rows else None
        if rows is not None and rows.shape != (len(index), w.shape[1]):
            raise ShapeError(f"head_loss: rows {rows.shape} do not fit {len(index)} ids of weight {w.shape}")
        xp = backend.get_array_module(x)
        C, V = w.shape[1], w.shape[0]
        x2 = x.reshape(-1, C)                                           # (N, C)
        t = targets.reshape(-1)
        N = x2.shape[0]
        ct = np.float64 if x.dtype == np.float64 else np.float32       # the loss's precision
        count = xp.maximum((t != ignore_index).sum(), 1).astype(ct)
        scale = (1 / count).astype(ct)                                  # on the device: no sync
        losses = xp.empty(N, ct)
        dx = xp.empty_like(x2) if need_x else None
        # The weight gradient's fp32 sum over chunks (cuBLAS writes fp32 from bf16 inputs).
        dw = xp.zeros(w.shape, np.float32 if w.dtype.itemsize <= 4 else w.dtype) if need_w else None
        if not need_w:          # a frozen head (LoRA): no fp32 sum to re-read, so chunks cost nothing
            chunk_bytes = min(chunk_bytes or runtime.options().head_loss_chunk_bytes, FROZEN_HEAD_CHUNK_BYTES)
        need_rows = need_rows and rows is not None
        drows = xp.zeros(rows.shape, np.float32 if rows.dtype.itemsize <= 4 else rows.dtype) if need_rows else None
        moved = rows - w[index] if rows is not None and need_x else None    # (k, C): the rows' change
        step = chunk_rows(V, x.dtype.itemsize, chunk_bytes)
        buf = xp.empty((min(step, N), V), x.dtype)
        for a in range(0, N, step):
            b = min(a + step, N)
            logits = buf[:b - a]                                        # (rows, V)
            matmul(x2[a:b], w.T, out=logits)
            if rows is not None:
                logits[:, index] = matmul(x2[a:b], rows.T)
            loss, lse = cross_entropy_forward(logits, t[a:b], ignore_index)
            losses[a:b] = loss
            if need_x or need_w or need_rows:
                grad = cross_entropy_backward(logits, t[a:b], lse, scale, ignore_index, out=logits)
                g_rows = grad[:, index] if rows is not None else None  # (rows, k)
                if need_x:
                    matmul(grad, w, out=dx[a:b])
                    if rows is not None:
                        matmul(g_rows, moved, out=dx[a:b], beta=1.0)
                if need_rows:
                    matmul(g_rows.T, x2[a:b], out=drows, beta=1.0)
                if need_w:
                    if rows is not None:
                        grad[:, index] = 0                              # those columns are the rows'
                    matmul(grad.T, x2[a:b], out=dw, beta=1.0)
        self.save(dx, dw, drows)
        self.x_shape, self.w_dtype = x.shape, w.dtype
        self.rows_dtype = rows.dtype if rows is not None else None
        return losses.sum() / count

    def backward(self, g):
        dx, dw, drows = self.saved
        self.saved = ()
        g = backend.get_array_module(next(a for a in (dx, dw, drows) if a is not None)).asarray(g)
        scale = not self.unit_grad                        # loss.backward() itself: g is exactly 1
        gx = gw = grows = None
        if dx is not None:
            if scale:
                dx *= g.astype(dx.dtype)
            gx = dx.reshape(self.x_shape)
        if dw is not None:
            gw = dw.astype(self.w_dtype, copy=False)      # the narrow copy is the one scaled
            if scale:
                gw *= g.astype(gw.dtype)
        if drows is not None:
            grows = drows.astype(self.rows_dtype, copy=False)
            if scale:
                grows *= g.astype(grows.dtype)
        return (gx, gw, None) + ((grows,) if self.rows_dtype is not None else ())


def head_loss(x: Tensor, weight: Tensor, targets, ignore_index: int = -100, chunk_bytes: int | None = None,
              rows: Tensor | None = None, index=None) -> Tensor:
    """The loss of linear(x, weight) under cross-entropy, without the whole logits array (HeadLoss);
    with rows and index, those logit columns from the rows (llamac.ops.lora.linear_with_rows)."""
    targets = targets if isinstance(targets, Tensor) else Tensor(targets)
    on = grad_enabled()
    extra = (rows,) if rows is not None else ()
    return HeadLoss.apply(x, weight, targets, *extra, index=index, ignore_index=ignore_index,
                          need_x=on and x.requires_grad, need_w=on and weight.requires_grad,
                          need_rows=on and rows is not None and rows.requires_grad, chunk_bytes=chunk_bytes)


class CrossEntropy(Function):
    """Mean negative log-likelihood of integer targets over logits (..., V), skipping ignore_index.
    Computed in fp32 whatever the logits' dtype; the gradient is softmax - onehot.
    GPU: kernels/cross_entropy.cu keeps only the logits and an fp32 lse per row (no fp32 (N, V)
    array); overwrite_logits=True lets the backward write the gradient into the logits' memory
    (for a caller whose logits feed nothing else, e.g. the model's training loss)."""

    def forward(self, logits, targets, ignore_index=-100, overwrite_logits=False):
        xp = backend.get_array_module(logits)
        if logits.shape[:-1] != targets.shape:
            raise ShapeError(f"cross_entropy: logits {logits.shape} and targets {targets.shape} do not fit "
                             "(targets must be logits' shape without the last axis)")
        if xp is not np and logits.dtype in backend.CUDA_TYPES:
            return self._forward_gpu(xp, logits, targets, ignore_index, overwrite_logits)
        V = logits.shape[-1]
        x = logits.reshape(-1, V).astype(compute_dtype(logits.dtype), copy=False)
        t = targets.reshape(-1)
        valid = t != ignore_index
        safe_t = xp.where(valid, t, 0)
        self.logits_shape, self.logits_dtype = logits.shape, logits.dtype
        if xp is np:
            count = max(int(valid.sum()), 1)
            row_scale = valid / x.dtype.type(count)                   # the mean's 1/count, 0 when ignored
            grad, lse = _cpu_softmax_scaled(x, row_scale.astype(x.dtype))
            picked = np.take_along_axis(x, safe_t[:, None], axis=-1)[:, 0]
            self.save(grad, safe_t, row_scale)
            self.on_cpu = True
            return np.asarray(np.where(valid, lse - picked, 0).sum() / x.dtype.type(count), x.dtype)
        m = x.max(axis=-1, keepdims=True)
        picked = xp.take_along_axis(x, safe_t[:, None], axis=-1)
        probs = x - m                                   # one (N, V) buffer, reused in place
        xp.exp(probs, out=probs)
        s = probs.sum(axis=-1, keepdims=True)
        probs /= s
        nll = (xp.log(s) + m - picked)[:, 0]
        count = xp.maximum(valid.sum(), 1).astype(x.dtype)
        self.save(probs, safe_t, valid, count)
        self.logits_shape, self.logits_dtype = logits.shape, logits.dtype
        return xp.where(valid, nll, 0).sum() / count

    def backward(self, g):
        if getattr(self, "gpu", False):
            return self._backward_gpu(g)
        if getattr(self, "on_cpu", False):
            grad, t, row_scale = self.saved               # softmax / count, ours alone: finish it in place
            grad[np.arange(len(t)), t] -= row_scale
            if g != 1:
                cpu.for_row_blocks(lambda a, b: np.multiply(grad[a:b], grad.dtype.type(g), out=grad[a:b]),
                                   len(grad), grad.size)
            return grad.reshape(self.logits_shape).astype(self.logits_dtype, copy=False), None
        probs, t, valid, count = self.saved
        xp = backend.get_array_module(probs)
        grad = probs
        grad[xp.arange(len(t)), t] -= 1                 # probs is ours alone: edit in place
        grad *= (valid[:, None] * (g / count)).astype(grad.dtype)
        return grad.reshape(self.logits_shape).astype(self.logits_dtype, copy=False), None

    # ------------------------------------------------------------ GPU: kernels/cross_entropy.cu
    def _forward_gpu(self, xp, logits, targets, ignore_index, overwrite_logits):
        loss, lse = cross_entropy_forward(logits, targets, ignore_index)
        t = targets.reshape(-1)
        count = xp.maximum((t != ignore_index).sum(), 1).astype(np.float32)
        self.save(logits, targets, lse, count)
        self.gpu, self.ignore_index, self.overwrite = True, ignore_index, overwrite_logits
        return loss.sum() / count

    def _backward_gpu(self, g):
        logits, targets, lse, count = self.saved
        scale = g.astype(np.float32) / count                   # on the device: no sync
        out = logits if self.overwrite and logits.flags.c_contiguous else None
        return cross_entropy_backward(logits, targets, lse, scale, self.ignore_index, out=out), None


# The CPU cross-entropy: exp runs once, a few rows at a time while they sit in the L2 cache, and
# writes softmax(x) / count straight into the array that becomes the gradient (the backward then
# only subtracts 1/count at the targets, and scales when the incoming gradient is not 1).
# Rows are split over the cores.
_CE_BLOCK_BYTES = 1 << 18


def _cpu_softmax_scaled(x, row_scale):
    """(softmax(x) * row_scale[:, None], logsumexp(x)) over the rows of a 2-D array."""
    N, V = x.shape
    out = np.empty_like(x)
    lse = np.empty(N, x.dtype)
    ones = np.ones(V, x.dtype)
    step = max(1, _CE_BLOCK_BYTES // (V * x.itemsize))

    def rows(a, b):
        for i in range(a, b, step):
            j = min(i + step, b)
            e, s = out[i:j], lse[i:j]
            m = x[i:j].max(axis=1)
            np.subtract(x[i:j], m[:, None], out=e)
            np.exp(e, out=e)
            np.matmul(e, ones, out=s)
            e *= (row_scale[i:j] / s)[:, None]
            np.log(s, out=s)
            s += m

    cpu.for_row_blocks(rows, N, x.size)
    return out, lse
