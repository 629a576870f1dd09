"""RMSNorm, and the residual add fused into the RMSNorm after it (x + h -> (x + h, norm(x + h))).

Forward and backward: one NumPy reference each, the CPU path in row blocks over the cores, the GPU
kernels kernels/rmsnorm.cu and kernels/add_rmsnorm.cu (whose backward serves both)."""
from __future__ import annotations

import numpy as np

from llamac import runtime
from llamac.engine import backend, cpu
from llamac.engine.ops import compute_dtype
from llamac.engine.tensor import Function, Tensor, grad_enabled, graph_inputs
from llamac.errors import LlamacError, ShapeError
from llamac.ops.common import THREADS, _cuda_dtype, _on_gpu, sm_count

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"rmsnorm": ("rmsnorm_forward", "rmsnorm_dw_reduce"),
           "add_rmsnorm": ("add_rmsnorm_forward", "add_rmsnorm_backward")}

# ---------------------------------------------------------------- RMSNorm
# y = x * rstd * w over the last axis, rstd = 1 / sqrt(mean(x^2) + eps) kept per row in fp32 for
# the backward. Kernel: kernels/rmsnorm.cu (one warp per row; deterministic fp32 weight gradient).

RMSNORM_MAX_C = 12288   # the backward keeps one fp32 row of dw per warp in 48 KB of shared memory


def _rmsnorm_options(C: int, dtype) -> tuple[str, ...]:
    """-DRMS_PACKS=K: the 16-byte packs per lane of a row of C, when K <= 8; 0 (re-read the row) else."""
    pack = 16 // np.dtype(dtype).itemsize
    k = -(-C // (32 * pack))
    return (f"-DRMS_PACKS={k if runtime.options().rmsnorm_register_cache and C % pack == 0 and k <= 8 else 0}",)


def rmsnorm_forward_reference(x, weight, eps=1e-5):
    """(y, rstd): y (..., C) in x's dtype, rstd (N,) fp32 (fp64 for fp64 x), N = x.size / C."""
    xp = backend.get_array_module(x)
    ct = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(ct, copy=False)
    rstd = 1 / xp.sqrt((x2 * x2).mean(axis=-1) + ct.type(eps))
    y = x2 * rstd[:, None] * weight.astype(ct, copy=False)
    return y.astype(x.dtype, copy=False).reshape(x.shape), rstd.astype(ct, copy=False)


def rmsnorm_backward_reference(dout, x, weight, rstd):
    """(dx in x's dtype, dw (C,) in fp32): the gradients of y = x * rstd * w."""
    ct = compute_dtype(x.dtype)
    C = x.shape[-1]
    d2 = dout.reshape(-1, C).astype(ct, copy=False)
    r = rstd.reshape(-1, 1).astype(ct, copy=False)
    xhat = x.reshape(-1, C).astype(ct, copy=False) * r
    dw = (d2 * xhat).sum(axis=0)
    gxhat = d2 * weight.astype(ct, copy=False)
    dx = (gxhat - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True)) * r
    return dx.astype(x.dtype, copy=False).reshape(x.shape), dw


def rmsnorm_forward(x, weight, eps=1e-5):
    """(y, rstd) for y = x / sqrt(mean(x^2) + eps) * weight over the last axis.

    x (..., C) and weight (C,) share a dtype; rstd is (N,) fp32 with N = x.size / C. CUDA kernel on
    CuPy arrays (x made contiguous if it is not), the reference on NumPy arrays.
    """
    xp = _on_gpu("rmsnorm_forward", x=x, weight=weight)
    C = x.shape[-1] if x.ndim else 0
    if weight.shape != (C,):
        raise ShapeError(f"rmsnorm_forward: weight {weight.shape} does not fit input {x.shape} (want ({C},))")
    if weight.dtype != x.dtype:
        raise LlamacError(f"rmsnorm_forward: weight is {weight.dtype} but x is {x.dtype}; dtypes must match")
    if xp is np:
        return rmsnorm_forward_reference(x, weight, eps)
    _cuda_dtype("rmsnorm_forward", x)
    x2 = xp.ascontiguousarray(x).reshape(-1, C)
    w = xp.ascontiguousarray(weight)
    N = x2.shape[0]
    out = xp.empty_like(x2)
    rstd = xp.empty(N, np.float32)
    if N and C:
        with x2.device:
            warps = THREADS // 32
            grid = max(1, min(-(-N // warps), sm_count() * 8))
            fn = backend.get_kernel("rmsnorm", "rmsnorm_forward", x.dtype, _rmsnorm_options(C, x.dtype))
            fn((grid,), (THREADS,), (x2, w, out, rstd, np.int64(N), np.int32(C), np.float32(eps)))
    return out.reshape(x.shape), rstd


def rmsnorm_backward(dout, x, weight, rstd):
    """(dx, dw) for y = rmsnorm(x) * weight: dx in x's dtype, dw (C,) in fp32, deterministic.

    rstd is rmsnorm_forward's second result. CUDA kernel on CuPy arrays, the reference on NumPy.
    """
    xp = _on_gpu("rmsnorm_backward", dout=dout, x=x, weight=weight, rstd=rstd)
    C = x.shape[-1] if x.ndim else 0
    if dout.shape != x.shape or weight.shape != (C,) or rstd.size * C != x.size:
        raise ShapeError(f"rmsnorm_backward: dout {dout.shape}, x {x.shape}, weight {weight.shape} and "
                         f"rstd {rstd.shape} do not fit")
    if xp is np or C > RMSNORM_MAX_C:
        return rmsnorm_backward_reference(dout, x, weight, rstd)
    dtype = _cuda_dtype("rmsnorm_backward", x)
    if dout.dtype != dtype or weight.dtype != dtype:
        raise LlamacError(f"rmsnorm_backward: dout {dout.dtype}, x {x.dtype} and weight {weight.dtype} must match")
    return _norm_backward_gpu(xp, dtype, dout, x, weight, rstd, None)   # add_rmsnorm's kernel, no dres


def _norm_backward_gpu(xp, dtype, dout, s, weight, rstd, dres):
    """(dx, dw) from kernels/add_rmsnorm.cu's backward (dres None: a null pointer, the plain RMSNorm
    backward): warps of a block take rows, each block writes its dw partial, then rmsnorm_dw_reduce
    sums the partials in block order into every column of dw (fp32)."""
    C = s.shape[-1]
    s2 = xp.ascontiguousarray(s).reshape(-1, C)
    d2 = xp.ascontiguousarray(dout).reshape(-1, C)
    res = np.uint64(0) if dres is None else xp.ascontiguousarray(dres).reshape(-1, C)
    w = xp.ascontiguousarray(weight)
    r = xp.ascontiguousarray(rstd, dtype=np.float32).reshape(-1)
    dx = xp.empty_like(s2)
    N = s2.shape[0]
    if not (N and C):
        return dx.reshape(s.shape), xp.zeros(C, np.float32)
    dw = xp.empty(C, np.float32)
    with s2.device:
        warps = max(1, min(THREADS // 32, RMSNORM_MAX_C // C))
        shared = warps * C * 4
        per_sm = max(1, min(2048 // (32 * warps), (200 << 10) // shared))
        grid = max(1, min(-(-N // warps), sm_count() * per_sm))
        partial = xp.empty((grid, C), np.float32)
        fn = backend.get_kernel("add_rmsnorm", "add_rmsnorm_backward", dtype, _rmsnorm_options(C, dtype))
        fn((grid,), (32 * warps,), (d2, s2, w, r, res, dx, partial, np.int64(N), np.int32(C)), shared_mem=shared)
        reduce = backend.get_kernel("rmsnorm", "rmsnorm_dw_reduce", dtype)
        reduce((-(-C // 32),), (256,), (partial, dw, np.int32(grid), np.int32(C)))
    return dx.reshape(s.shape), dw


# ---------------------------------------------------------------- residual add + RMSNorm
# s = x + h (the residual stream, in x's dtype), y = rmsnorm(s) * w; the backward adds the residual
# stream's own gradient dres into dx. Kernel: kernels/add_rmsnorm.cu (one pass each way instead of two).

def add_rmsnorm_forward_reference(x, h, weight, eps=1e-5):
    """(s, y, rstd): s = x + h rounded to x's dtype, then rmsnorm_forward_reference(s, weight, eps)."""
    xp = backend.get_array_module(x)
    ct = compute_dtype(x.dtype)
    s = (x.astype(ct, copy=False) + h.astype(ct, copy=False)).astype(x.dtype)
    y, rstd = rmsnorm_forward_reference(s, weight, eps)
    return s, y, xp.asarray(rstd)


def add_rmsnorm_backward_reference(dout, s, weight, rstd, dres=None):
    """(dx, dw fp32): rmsnorm_backward_reference(dout, s, weight, rstd) with dres (if any) added to dx in fp32."""
    dx, dw = rmsnorm_backward_reference(dout, s, weight, rstd)
    if dres is None:
        return dx, dw
    ct = compute_dtype(s.dtype)
    C = s.shape[-1]
    d2 = dout.reshape(-1, C).astype(ct, copy=False)
    r = rstd.reshape(-1, 1).astype(ct, copy=False)
    shat = s.reshape(-1, C).astype(ct, copy=False) * r
    gshat = d2 * weight.astype(ct, copy=False)
    full = (gshat - shat * (gshat * shat).mean(axis=-1, keepdims=True)) * r + dres.reshape(-1, C).astype(ct)
    return full.astype(s.dtype, copy=False).reshape(s.shape), dw


def add_rmsnorm_forward(x, h, weight, eps=1e-5):
    """(s, y, rstd): s = x + h, y = s / sqrt(mean(s^2) + eps) * weight over the last axis, rstd (N,) fp32.

    x, h (..., C) and weight (C,) share a dtype. CUDA kernel on CuPy arrays (one pass), the reference
    on NumPy arrays.
    """
    xp = _on_gpu("add_rmsnorm_forward", x=x, h=h, weight=weight)
    C = x.shape[-1] if x.ndim else 0
    if h.shape != x.shape or weight.shape != (C,):
        raise ShapeError(f"add_rmsnorm_forward: x {x.shape}, h {h.shape} and weight {weight.shape} do not fit")
    if h.dtype != x.dtype or weight.dtype != x.dtype:
        raise LlamacError(f"add_rmsnorm_forward: x {x.dtype}, h {h.dtype} and weight {weight.dtype} must match")
    if xp is np:
        return add_rmsnorm_forward_reference(x, h, weight, eps)
    _cuda_dtype("add_rmsnorm_forward", x)
    x2 = xp.ascontiguousarray(x).reshape(-1, C)
    h2 = xp.ascontiguousarray(h).reshape(-1, C)
    w = xp.ascontiguousarray(weight)
    N = x2.shape[0]
    s, y = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty(N, np.float32)
    if N and C:
        with x2.device:
            warps = THREADS // 32
            grid = max(1, min(-(-N // warps), sm_count() * 8))
            fn = backend.get_kernel("add_rmsnorm", "add_rmsnorm_forward", x.dtype, _rmsnorm_options(C, x.dtype))
            fn((grid,), (THREADS,), (x2, h2, w, s, y, rstd, np.int64(N), np.int32(C), np.float32(eps)))
    return s.reshape(x.shape), y.reshape(x.shape), rstd


def add_rmsnorm_backward(dout, s, weight, rstd, dres=None):
    """(dx, dw): the RMSNorm backward at s (dw (C,) fp32, deterministic) with dres added to dx.

    dres: the gradient the residual stream s already received from its other consumers (or None);
    dx = d rmsnorm / ds + dres in one pass, a new array. CUDA kernel on CuPy arrays, else the reference.
    """
    xp = _on_gpu("add_rmsnorm_backward", dout=dout, s=s, weight=weight, rstd=rstd,
                 **({} if dres is None else {"dres": dres}))
    C = s.shape[-1] if s.ndim else 0
    if (dout.shape != s.shape or weight.shape != (C,) or rstd.size * C != s.size
            or (dres is not None and dres.shape != s.shape)):
        raise ShapeError(f"add_rmsnorm_backward: dout {dout.shape}, s {s.shape}, weight {weight.shape}, "
                         f"rstd {rstd.shape} and dres {None if dres is None else dres.shape} do not fit")
    if xp is np or C > RMSNORM_MAX_C:
        return add_rmsnorm_backward_reference(dout, s, weight, rstd, dres)
    dtype = _cuda_dtype("add_rmsnorm_backward", s)
    if dout.dtype != dtype or weight.dtype != dtype or (dres is not None and dres.dtype != dtype):
        raise LlamacError("add_rmsnorm_backward: dout, s, weight and dres must share one dtype")
    return _norm_backward_gpu(xp, dtype, dout, s, weight, rstd, dres)


class RMSNorm(Function):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, statistics in fp32.
    On the CPU: rms_norm_forward/backward (rows split over the cores, L2-sized chunks)."""

    def forward(self, x, weight, eps=1e-5):
        xp = backend.get_array_module(x)
        if xp is not np and x.dtype in backend.CUDA_TYPES and weight.dtype == x.dtype:   # kernels/rmsnorm.cu
            out, rstd = rmsnorm_forward(x, weight, eps)
            self.save(x, rstd, weight)
            self.gpu = True                                    # saved x, not xhat
            return out
        if xp is np:
            out, state = rms_norm_forward(x, weight, eps)
            self.save(*state)
            self.on_cpu = True
            return out
        # The GPU with a dtype or weight the kernel does not take: whole-array xp.
        ct = compute_dtype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xhat = xp.empty(x2.shape, ct)
        rstd = xp.empty((len(x2), 1), ct)
        out = xp.empty(x2.shape, x.dtype)
        xs = x2.astype(ct, copy=False)
        xp.multiply(xs, xs, out=xhat)
        xp.mean(xhat, axis=-1, keepdims=True, out=rstd)
        rstd += eps
        xp.sqrt(rstd, out=rstd)
        xp.reciprocal(rstd, out=rstd)
        xp.multiply(xs, rstd, out=xhat)
        out[...] = xhat * weight
        self.save(xhat, rstd, weight)
        self.shape = x.shape
        return out.reshape(x.shape)

    def backward(self, g):
        if getattr(self, "on_cpu", False):
            return rms_norm_backward(g, *self.saved)
        xhat, rstd, weight = self.saved
        if getattr(self, "gpu", False):                        # kernels/rmsnorm.cu (xhat is x here)
            dx, dw = rmsnorm_backward(g, xhat, weight, rstd)
            return dx, dw.astype(weight.dtype, copy=False)
        # forward's whole-array xp path (the GPU)
        xp = backend.get_array_module(g)
        g2 = g.reshape(-1, g.shape[-1])
        gx = xp.empty(g2.shape, g.dtype)
        gf = g2.astype(xhat.dtype, copy=False)
        gw = (gf * xhat).sum(axis=0)
        gxhat = gf * weight
        dot = (gxhat * xhat).mean(axis=-1, keepdims=True)
        gxhat -= xhat * dot
        gxhat *= rstd
        gx[...] = gxhat
        return gx.reshape(self.shape), gw.astype(weight.dtype, copy=False)


class _ResidualSum(Function):
    """s = x + h, computed by kernels/add_rmsnorm.cu together with the RMSNorm of s (_NormOfSum).

    The backward is Add's (the gradient of s to both inputs), except that the paired norm node may
    already have folded the gradient s received from the next residual add into its own dx (one pass
    instead of a norm backward plus an add): then that sum is what flows on."""

    def backward(self, g):
        state = self.state
        prev = self.inputs[0]._ctx if self.inputs is not None else None
        if state.dx is not None:
            if g is not state.g_res:
                # s had another consumer whose gradient the engine added after the norm folded in
                # g_res: put the norm's share back on top (never happens in the model; kept exact
                # up to one rounding).
                ct = compute_dtype(g.dtype)
                g = (g.astype(ct) - state.g_res.astype(ct) + state.dx.astype(ct)).astype(g.dtype)
            else:
                g = state.dx
        state.g_res = state.dx = None
        if isinstance(prev, _ResidualSum):
            # The residual gradient of our input x, which x's own norm node can fold in (if x has no
            # other consumer, this is exactly what the engine will hold as x's gradient).
            prev.state.g_res = g
        return g, g


class _NormOfSum(Function):
    """y = rmsnorm(s) * w for the s of a _ResidualSum; its backward adds the residual gradient of s
    (when one has arrived) into dx in the same kernel, and hands the engine no second array."""

    def backward(self, g):
        s, rstd, w = self.saved
        state = self.state
        res = state.g_res
        dx, dw = add_rmsnorm_backward(g, s, w, rstd, dres=res)
        dw = dw.astype(w.dtype, copy=False)
        if res is None:
            return dx, dw
        state.dx = dx               # taken by the _ResidualSum node of s, which runs after us
        return None, dw


class _SumState:
    __slots__ = ("g_res", "dx")

    def __init__(self):
        self.g_res = self.dx = None


def _record(fn, inputs, out: Tensor):
    """Attach a Function node computed outside Function.apply (a kernel with two outputs)."""
    fn.inputs = graph_inputs(inputs)
    fn.needs_grad = tuple(t.requires_grad for t in inputs)
    out._ctx = fn


def use_fused_residual(x, weight) -> bool:
    """Whether add_rms_norm takes the fused kernel for these operands (GPU, one kernel dtype)."""
    data = x.data if isinstance(x, Tensor) else x
    return (backend.get_array_module(data) is not np and data.dtype in backend.CUDA_TYPES
            and weight.dtype == data.dtype and data.shape[-1] <= RMSNORM_MAX_C)


def add_rms_norm(x: Tensor, h: Tensor, weight: Tensor, eps: float = 1e-5):
    """(s, n): the residual stream s = x + h and n = rms_norm(s, weight, eps), as two tensors.

    GPU: one kernel forward (kernels/add_rmsnorm.cu) and one backward that also adds the gradient s
    receives from the next residual add. CPU (and anything the kernel does not take): x + h, rms_norm."""
    if not (use_fused_residual(x, weight) and h.dtype == x.dtype and h.shape == x.shape
            and backend.get_array_module(h.data) is x.xp):
        s = x + h
        return s, rms_norm(s, weight, eps)
    s_arr, y, rstd = add_rmsnorm_forward(x.data, h.data, weight.data, eps)
    record = grad_enabled()
    state = _SumState()
    s = Tensor(s_arr, requires_grad=record and (x.requires_grad or h.requires_grad))
    if s.requires_grad:
        fs = _ResidualSum()
        fs.state = state
        _record(fs, (x, h), s)
    n = Tensor(y, requires_grad=record and (s.requires_grad or weight.requires_grad))
    if n.requires_grad:
        fn = _NormOfSum()
        fn.state = state
        fn.save(s_arr, rstd, weight.data)
        _record(fn, (s, weight), n)
    return s, n


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return RMSNorm.apply(x, weight, eps=eps)


# ---------------------------------------------------------------- RMSNorm

def rms_norm_forward(x, weight, eps):
    """Rows split over the cores, in L2-sized chunks: sum of squares as one einsum pass, then two
    passes for the output. Saves x and 1/rms (xhat is recomputed chunk by chunk in the backward)."""
    ct = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(ct, copy=False)
    n, C = x2.shape
    rstd = np.empty(n, ct)
    out = np.empty(x2.shape, ct)
    w = weight.astype(ct, copy=False)

    def rows(a, b):
        r = rstd[a:b]
        np.einsum("ij,ij->i", x2[a:b], x2[a:b], out=r)
        r *= 1 / C
        r += eps
        np.sqrt(r, out=r)
        np.reciprocal(r, out=r)
        np.multiply(x2[a:b], r[:, None], out=out[a:b])
        out[a:b] *= w

    cpu.for_row_blocks(rows, n, x2.size, C * ct.itemsize)
    return out.reshape(x.shape).astype(x.dtype, copy=False), (x2, rstd, weight, x.shape)


def rms_norm_backward(g, x2, rstd, weight, shape):
    """gx = (g w - xhat mean(g w xhat)) / rms; gw = sum over rows of g xhat (one partial sum per
    thread, added in a fixed order: deterministic)."""
    ct = x2.dtype
    n, C = x2.shape
    g2 = g.reshape(n, C).astype(ct, copy=False)
    w = weight.astype(ct, copy=False)
    gx = np.empty((n, C), ct)
    partial_gw = {}

    def rows(a, b):
        xh = np.multiply(x2[a:b], rstd[a:b, None])
        t = np.multiply(g2[a:b], xh)
        partial = t.sum(axis=0)
        key = cpu.block_id()
        partial_gw[key] = partial_gw[key] + partial if key in partial_gw else partial
        gxh = np.multiply(g2[a:b], w, out=t)
        dot = np.einsum("ij,ij->i", gxh, xh)
        dot *= 1 / C
        xh *= dot[:, None]
        gxh -= xh
        np.multiply(gxh, rstd[a:b, None], out=gx[a:b])

    cpu.for_row_blocks(rows, n, x2.size, C * ct.itemsize)
    gw = sum(partial_gw[k] for k in sorted(partial_gw))
    return gx.reshape(shape), gw.astype(weight.dtype, copy=False)
