"""What every op module's GPU launcher shares: operand checks, launch grids, the SM count.

Nothing here imports cupy: llamac.engine.backend hands out the array module and compiled kernels."""
from __future__ import annotations

import numpy as np

from llamac.engine import backend
from llamac.errors import DeviceError, LlamacError, ShapeError

THREADS = 256
# 32 blocks of 256 threads per SM on H100's 132 SMs: enough resident warps to
# cover memory latency; the grid-stride loops do the rest, so a bigger grid
# only costs scheduling.
MAX_BLOCKS = 132 * 32

# ---------------------------------------------------------------- helpers

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
