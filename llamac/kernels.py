"""Hand-written CUDA kernels: each launcher beside the NumPy reference it must match (llm.c style).

The launchers run kernels/NAME.cu on CuPy arrays and fall back to the
reference on NumPy arrays, so callers never branch on the device. The
references are written against `xp` and also run on CuPy arrays, which the
tests and benchmarks use to check the kernels on the GPU.

Nothing here imports cupy: llamac.backend hands out the array module and the
compiled functions, so this module imports on machines with no GPU.
"""
from __future__ import annotations

import numpy as np

from llamac import backend
from llamac.errors import DeviceError, LlamacError, ShapeError

THREADS = 256
# 32 blocks of 256 threads per SM on H100's 132 SMs: enough resident warps to
# cover memory latency; the grid-stride loops do the rest, so a bigger grid
# only costs scheduling.
MAX_BLOCKS = 132 * 32

# Every extern "C" entry point each kernels/NAME.cu must export; the NVRTC
# tests check the compiled PTX against this, so a renamed kernel fails in CI.
KERNEL_FUNCTIONS = {
    "swiglu": ("swiglu_forward", "swiglu_backward", "swiglu_backward_recompute"),
    "rmsnorm": ("rmsnorm_forward", "rmsnorm_dw_reduce"),
    "add_rmsnorm": ("add_rmsnorm_forward", "add_rmsnorm_backward"),
    "rope": ("rope_forward", "rope_backward"),
    "embedding": ("embedding_backward",),
    "cross_entropy": ("cross_entropy_forward", "cross_entropy_backward"),
    "adamw": ("adamw_sumsq", "adamw_finalize", "adamw_update"),
    # launcher: llamac/flash_backward.py
    "flash_attn_bwd": ("flash_attn_bwd_preprocess", "flash_attn_bwd", "flash_attn_bwd_convert_dq"),
    # bf16/fp16 only (the fp32 build is an entry point that traps); launcher: llamac/flash.py
    "flash_attn_fwd": ("flash_attn_forward",),
    # bf16 only (DTYPE unused); launchers and references in llamac/decode.py
    "decode": ("decode_gemv_store", "decode_gemv_resid", "decode_gemv_swiglu", "decode_gemv_logits",
               "decode_gemv_qkv", "decode_attention", "decode_sample"),
}


# ---------------------------------------------------------------- helpers

def _compute_dtype(dtype) -> np.dtype:
    """fp32 for fp32/bf16/fp16 (what the kernels compute in), fp64 for fp64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _sigmoid(xp, x):
    # 1 / (1 + exp(-x)): for x << 0, exp overflows to inf and the result is the correct 0,
    # so only the overflow warning needs silencing; two passes instead of where()'s four.
    with np.errstate(over="ignore"):
        z = xp.exp(-x)
    z += 1
    return xp.reciprocal(z, out=z)


def _check_operands(op: str, inputs: dict, outputs: dict):
    """The array module all operands share, after checking shape, dtype and (on the GPU) layout.

    `outputs` maps names to arrays or None (None: the launcher allocates).
    """
    first_name, first = next(iter(inputs.items()))
    given = {**inputs, **{k: v for k, v in outputs.items() if v is not None}}
    modules = {}
    for name, array in given.items():
        xp = backend.get_array_module(array)
        if not isinstance(array, xp.ndarray):
            raise LlamacError(f"{op}: {name} must be a NumPy or CuPy array, not {type(array).__name__}")
        modules[name] = xp
    if len(set(modules.values())) > 1:
        where = ", ".join(f"{n} on {'cpu' if m is np else 'cuda'}" for n, m in modules.items())
        raise DeviceError(f"{op}: operands must all be on one device ({where})")
    for name, array in given.items():
        if array.shape != first.shape:
            raise ShapeError(f"{op}: {name} has shape {array.shape} but {first_name} has {first.shape}; shapes must match")
        if array.dtype != first.dtype:
            raise LlamacError(f"{op}: {name} is {array.dtype} but {first_name} is {first.dtype}; dtypes must match")
    xp = modules[first_name]
    if xp is np:
        if not backend.is_float(first.dtype):
            raise LlamacError(f"{op}: needs floating-point arrays, got {first.dtype}")
        return xp
    if first.dtype not in backend.CUDA_TYPES:
        raise LlamacError(f"{op}: the CUDA kernel takes float32, bfloat16 or float16, got {first.dtype}")
    for name, array in given.items():
        # The kernels index flat memory, so a strided view would be read wrongly, not slowly.
        if not array.flags.c_contiguous:
            raise LlamacError(f"{op}: {name} is not C-contiguous; pass xp.ascontiguousarray({name})")
    devices = {name: array.device.id for name, array in given.items()}
    if len(set(devices.values())) > 1:
        raise DeviceError(f"{op}: operands are on different GPUs ({devices})")
    # The kernels declare every pointer __restrict__ (and read through the
    # read-only cache), so an output may not share memory with any other operand.
    spans = {name: (a.data.ptr, a.data.ptr + a.nbytes) for name, a in given.items()}
    for out_name in (k for k, v in outputs.items() if v is not None):
        lo, hi = spans[out_name]
        for name, (other_lo, other_hi) in spans.items():
            if name != out_name and lo < other_hi and other_lo < hi:
                raise LlamacError(f"{op}: {out_name} overlaps {name} in memory; pass a separate output array")
    return xp


def _launch_config(n: int, arrays) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) for an elementwise kernel over n elements.

    When every pointer is 16-byte aligned the kernel moves one 16-byte pack
    per thread per step, so the grid is sized for n / pack work items, not n;
    the kernel decides the path itself, and the grid-stride loops keep any grid
    correct either way.
    """
    itemsize = arrays[0].dtype.itemsize
    aligned = all(a.data.ptr % 16 == 0 for a in arrays)
    items = -(-n // (16 // itemsize)) if aligned else n
    blocks = max(1, min(-(-items // THREADS), MAX_BLOCKS))
    return (blocks,), (THREADS,)


def _fill_out(out, value):
    """Write a reference result into a caller's NumPy output array, or return it."""
    if out is None:
        return value
    out[...] = value
    return out


# ---------------------------------------------------------------- SwiGLU
# The Llama MLP gate: silu(gate) * up, silu(x) = x * sigmoid(x). Kernel: kernels/swiglu.cu.

def swiglu_forward_reference(gate, up):
    """silu(gate) * up, computed in fp32 for fp32/bf16/fp16 inputs and returned in their dtype."""
    xp = backend.get_array_module(gate)
    ct = _compute_dtype(gate.dtype)
    g, u = gate.astype(ct, copy=False), up.astype(ct, copy=False)
    out = _sigmoid(xp, g)
    out *= g
    out *= u
    return out.astype(gate.dtype, copy=False)


def swiglu_backward_reference(gate, up, dout):
    """(dgate, dup) for out = silu(gate) * up given dout, in fp32 for fp32/bf16/fp16 inputs."""
    xp = backend.get_array_module(gate)
    ct = _compute_dtype(gate.dtype)
    g, u, d = gate.astype(ct, copy=False), up.astype(ct, copy=False), dout.astype(ct, copy=False)
    s = _sigmoid(xp, g)
    silu = g * s
    dup = d * silu
    # d silu/dg = s + g s (1 - s) = s + silu (1 - s)
    dgate = silu - silu * s
    dgate += s
    dgate *= d
    dgate *= u
    return dgate.astype(gate.dtype, copy=False), dup.astype(gate.dtype, copy=False)


def swiglu_forward(gate, up, out=None):
    """silu(gate) * up: the CUDA kernel on CuPy arrays, the reference on NumPy arrays.

    gate, up (and out, when given) must share shape and dtype; on the GPU they
    must be C-contiguous float32, bfloat16 or float16.
    """
    xp = _check_operands("swiglu_forward", {"gate": gate, "up": up}, {"out": out})
    if xp is np:
        return _fill_out(out, swiglu_forward_reference(gate, up))
    if out is None:
        out = xp.empty_like(gate)
    n = gate.size
    if n:
        with gate.device:
            fn = backend.get_kernel("swiglu", "swiglu_forward", gate.dtype)
            grid, block = _launch_config(n, (gate, up, out))
            fn(grid, block, (gate, up, out, np.int64(n)))
    return out


def swiglu_backward(gate, up, dout, dgate=None, dup=None):
    """(dgate, dup) for out = silu(gate) * up: the CUDA kernel on CuPy arrays, the reference on NumPy arrays.

    All operands must share shape and dtype; on the GPU they must be
    C-contiguous float32, bfloat16 or float16. dgate/dup, when given, are
    written in place and returned.
    """
    xp = _check_operands("swiglu_backward", {"gate": gate, "up": up, "dout": dout}, {"dgate": dgate, "dup": dup})
    if xp is np:
        ref_dgate, ref_dup = swiglu_backward_reference(gate, up, dout)
        return _fill_out(dgate, ref_dgate), _fill_out(dup, ref_dup)
    if dgate is None:
        dgate = xp.empty_like(gate)
    if dup is None:
        dup = xp.empty_like(gate)
    n = gate.size
    if n:
        with gate.device:
            fn = backend.get_kernel("swiglu", "swiglu_backward", gate.dtype)
            grid, block = _launch_config(n, (gate, up, dout, dgate, dup))
            fn(grid, block, (gate, up, dout, dgate, dup, np.int64(n)))
    return dgate, dup


def swiglu_backward_recompute(gate, up, dout):
    """(dgate, dup, h): swiglu_backward's gradients plus the forward output h = silu(gate) * up,
    recomputed in the same pass (kernels/swiglu.cu) so the forward need not keep h."""
    xp = _check_operands("swiglu_backward_recompute", {"gate": gate, "up": up, "dout": dout}, {})
    if xp is np:
        return (*swiglu_backward_reference(gate, up, dout), swiglu_forward_reference(gate, up))
    dgate, dup, h = xp.empty_like(gate), xp.empty_like(gate), xp.empty_like(gate)
    n = gate.size
    if n:
        with gate.device:
            fn = backend.get_kernel("swiglu", "swiglu_backward_recompute", gate.dtype)
            grid, block = _launch_config(n, (gate, up, dout, dgate, dup, h))
            fn(grid, block, (gate, up, dout, dgate, dup, h, np.int64(n)))
    return dgate, dup, h


# ---------------------------------------------------------------- shared by the row kernels

_SM_COUNTS: dict = {}


def sm_count() -> int:
    """Streaming multiprocessors on the current GPU (132 on H100 SXM): grids are sized from it."""
    cp = backend.cupy_module()
    dev = cp.cuda.Device().id
    if dev not in _SM_COUNTS:
        _SM_COUNTS[dev] = int(cp.cuda.Device(dev).attributes["MultiProcessorCount"])
    return _SM_COUNTS[dev]


def _on_gpu(op: str, **arrays):
    """The array module of the named arrays (one device for all); on the GPU, checks the float dtypes."""
    modules = {name: backend.get_array_module(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        if not isinstance(a, modules[name].ndarray):
            raise LlamacError(f"{op}: {name} must be a NumPy or CuPy array, not {type(a).__name__}")
    if len(set(modules.values())) > 1:
        where = ", ".join(f"{n} on {'cpu' if m is np else 'cuda'}" for n, m in modules.items())
        raise DeviceError(f"{op}: operands must all be on one device ({where})")
    return next(iter(modules.values()))


def _cuda_dtype(op: str, array):
    if array.dtype not in backend.CUDA_TYPES:
        raise LlamacError(f"{op}: the CUDA kernel takes float32, bfloat16 or float16, got {array.dtype}")
    return array.dtype


# ---------------------------------------------------------------- RMSNorm
# y = x * rstd * w over the last axis, rstd = 1 / sqrt(mean(x^2) + eps) kept per row in fp32 for
# the backward. Kernel: kernels/rmsnorm.cu (one warp per row; deterministic fp32 weight gradient).

RMSNORM_MAX_C = 12288   # the backward keeps one fp32 row of dw per warp in 48 KB of shared memory
RMSNORM_CACHE = True    # keep each lane's share of a row in registers between the passes (RMS_PACKS)


def _rmsnorm_options(C: int, dtype) -> tuple[str, ...]:
    """-DRMS_PACKS=K: the 16-byte packs per lane of a row of C, when K <= 8; 0 (re-read the row) else."""
    pack = 16 // np.dtype(dtype).itemsize
    k = -(-C // (32 * pack))
    return (f"-DRMS_PACKS={k if RMSNORM_CACHE and C % pack == 0 and k <= 8 else 0}",)


def rmsnorm_forward_reference(x, weight, eps=1e-5):
    """(y, rstd): y (..., C) in x's dtype, rstd (N,) fp32 (fp64 for fp64 x), N = x.size / C."""
    xp = backend.get_array_module(x)
    ct = _compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(ct, copy=False)
    rstd = 1 / xp.sqrt((x2 * x2).mean(axis=-1) + ct.type(eps))
    y = x2 * rstd[:, None] * weight.astype(ct, copy=False)
    return y.astype(x.dtype, copy=False).reshape(x.shape), rstd.astype(ct, copy=False)


def rmsnorm_backward_reference(dout, x, weight, rstd):
    """(dx in x's dtype, dw (C,) in fp32): the gradients of y = x * rstd * w."""
    ct = _compute_dtype(x.dtype)
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
    ct = _compute_dtype(x.dtype)
    s = (x.astype(ct, copy=False) + h.astype(ct, copy=False)).astype(x.dtype)
    y, rstd = rmsnorm_forward_reference(s, weight, eps)
    return s, y, xp.asarray(rstd)


def add_rmsnorm_backward_reference(dout, s, weight, rstd, dres=None):
    """(dx, dw fp32): rmsnorm_backward_reference(dout, s, weight, rstd) with dres (if any) added to dx in fp32."""
    dx, dw = rmsnorm_backward_reference(dout, s, weight, rstd)
    if dres is None:
        return dx, dw
    ct = _compute_dtype(s.dtype)
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


# ---------------------------------------------------------------- RoPE
# Meta's interleaved pairs (2i, 2i+1) of each head rotated by t * freq_i; the backward rotates by
# -angle. x (B, T, H, hs), cos/sin (T, hs/2). Kernel: kernels/rope.cu.

def rope_reference(x, cos, sin, sign=1.0):
    """x rotated pairwise by +angle (sign 1, the forward) or -angle (sign -1, the backward)."""
    xp = backend.get_array_module(x)
    ct = _compute_dtype(x.dtype)
    B, T, H, hs = x.shape
    pairs = x.reshape(B, T, H, hs // 2, 2).astype(ct, copy=False)    # (B, T, H, hs/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos.astype(ct, copy=False)[None, :, None, :]                 # (1, T, 1, hs/2)
    s = sin.astype(ct, copy=False)[None, :, None, :] * ct.type(sign)
    out = xp.empty(pairs.shape, ct)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(B, T, H, hs).astype(x.dtype, copy=False)


def _rope(op, x, cos, sin, sign):
    xp = _on_gpu(op, x=x, cos=cos, sin=sin)
    if x.ndim != 4 or x.shape[3] % 2:
        raise ShapeError(f"{op}: x must be (B, T, H, hs) with hs even, got {x.shape}")
    B, T, H, hs = x.shape
    if cos.shape != (T, hs // 2) or sin.shape != (T, hs // 2):
        raise ShapeError(f"{op}: cos {cos.shape} / sin {sin.shape} do not fit x {x.shape} (want {(T, hs // 2)})")
    if xp is np:
        return rope_reference(x, cos, sin, sign)
    dtype = _cuda_dtype(op, x)
    # Read in place when only the positions are strided (q or k inside a packed projection).
    x_row = position_stride(x)
    if x_row is None:
        x = xp.ascontiguousarray(x)
        x_row = H * hs
    # The model's tables are in its own dtype: read them as they are (exact widening), no cast.
    options = ("-DROPE_TABLE_IN_DTYPE",) if cos.dtype == dtype and dtype != np.float32 else ()
    table = dtype if options else np.float32
    cos = xp.ascontiguousarray(cos, dtype=table)
    sin = xp.ascontiguousarray(sin, dtype=table)
    out = xp.empty(x.shape, dtype)
    if x.size:
        with x.device:
            fn = backend.get_kernel("rope", op, dtype, options)
            grid, block = _launch_config(x.size, (x, out))
            fn(grid, block, (x, cos, sin, out, np.int64(x.size), np.int32(T), np.int32(H), np.int32(hs),
                             np.int64(x_row)))
    return out


def position_stride(x):
    """Elements from one position to the next of a (B, T, H, hs) array whose (H, hs) block per
    position is contiguous and whose B*T positions are evenly spaced (a C-contiguous array: H*hs;
    q, k or v of a packed (B, T, (H + 2 Hkv) hs) projection: its width); None for other layouts."""
    B, T, H, hs = x.shape
    item = x.itemsize
    if (hs > 1 and x.strides[3] != item) or (H > 1 and x.strides[2] != hs * item):
        return None
    if T > 1:
        step = x.strides[1]
        if B > 1 and x.strides[0] != T * step:
            return None
    else:
        step = x.strides[0] if B > 1 else H * hs * item
    if step % item or step < H * hs * item:
        return None
    return step // item


def rope_forward(x, cos, sin):
    """x (B, T, H, hs) rotated by angle t * freq_i per pair (2i, 2i+1); cos, sin (T, hs/2).

    CUDA kernel on CuPy arrays (float32/bfloat16/float16 x; fp32 tables, or tables in x's dtype),
    the reference on NumPy arrays. Returns a new array.
    """
    return _rope("rope_forward", x, cos, sin, 1.0)


def rope_backward(dout, cos, sin):
    """The gradient of rope_forward: dout rotated by -angle."""
    return _rope("rope_backward", dout, cos, sin, -1.0)


# ---------------------------------------------------------------- embedding backward
# dW[v] = sum of dout rows whose id is v, in a fixed order. Kernel: kernels/embedding.cu.

def embedding_backward_reference(ids, dout, num_embeddings):
    """dW (V, C) in dout's dtype, summed in fp32 (fp64 for fp64): np.add.at semantics."""
    xp = backend.get_array_module(dout)
    ct = _compute_dtype(dout.dtype)
    C = dout.shape[-1]
    full = xp.zeros((num_embeddings, C), ct)
    xp.add.at(full, ids.reshape(-1), dout.reshape(-1, C).astype(ct, copy=False))
    return full.astype(dout.dtype, copy=False)


def embedding_backward(ids, dout, num_embeddings):
    """dW (num_embeddings, C) for out = W[ids]: dout (..., C) rows summed per id, deterministically.

    ids: integer array with ids.size rows of dout. On CuPy arrays: a device sort, then the kernel
    (ids outside [0, V) contribute nothing); on NumPy arrays: the reference.
    """
    xp = _on_gpu("embedding_backward", ids=ids, dout=dout)
    C = dout.shape[-1] if dout.ndim else 0
    if ids.dtype.kind not in "iu":
        raise LlamacError(f"embedding_backward: ids must be integers, got {ids.dtype}")
    if ids.size * C != dout.size:
        raise ShapeError(f"embedding_backward: {ids.size} ids do not fit dout {dout.shape}")
    V = int(num_embeddings)
    if xp is np:
        return embedding_backward_reference(ids, dout, V)
    dtype = _cuda_dtype("embedding_backward", dout)
    d2 = xp.ascontiguousarray(dout).reshape(-1, C)
    N = d2.shape[0]
    out = xp.zeros((V, C), dtype)
    if N and C and V:
        with d2.device:
            flat = ids.reshape(-1).astype(np.int64, copy=False)
            flat = xp.where((flat < 0) | (flat >= V), V, flat)            # invalid ids sort last, skipped
            keys = flat * np.int64(N) + xp.arange(N, dtype=np.int64)      # distinct: any sort is stable
            keys = xp.sort(keys)
            packs = -(-C // (16 // dtype.itemsize))                    # 16-byte packs per row
            threads = min(THREADS, -(-packs // 32) * 32)
            fn = backend.get_kernel("embedding", "embedding_backward", dtype)
            fn((min(N, 1 << 24),), (threads,), (keys, d2, out, np.int64(N), np.int32(C), np.int64(V)))
    return out


# ---------------------------------------------------------------- cross-entropy
# Per-row loss = lse - logit[target] (0 where target == ignore_index) and its gradient
# (softmax - onehot) * scale, with no fp32 (N, V) array. Kernel: kernels/cross_entropy.cu.

CE_THREADS = 512


def cross_entropy_forward_reference(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)) in fp32 (fp64 for fp64 logits); loss 0 on ignored rows."""
    xp = backend.get_array_module(logits)
    ct = _compute_dtype(logits.dtype)
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
    ct = _compute_dtype(logits.dtype)
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
