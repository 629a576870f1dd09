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
    "swiglu": ("swiglu_forward", "swiglu_backward"),
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
