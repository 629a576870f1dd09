"""Kernel launches beyond CuPy's own call: programmatic dependent launch (the next kernel starts while the
one before it finishes), persistent grids sized by the occupancy API, and the dynamic shared memory
opt-in, all through the CUDA driver (ctypes), on the compiled functions backend.get_kernel returns."""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from llamac import runtime
from llamac.engine import backend
from llamac.errors import LlamacError


class _LaunchAttribute(ctypes.Structure):     # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):        # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6        # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_SCALAR_ARGS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
                np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.float32): ctypes.c_float}


@functools.lru_cache(maxsize=1)
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx (CUDA 12+), or None."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


_MAX_DYNAMIC_SHARED = 8                       # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


def _driver_call(name: str, *args):
    status = getattr(ctypes.CDLL("libcuda.so.1"), name)(*args)
    if status != 0:
        raise LlamacError(f"{name} failed with CUDA error {status}")


@functools.lru_cache(maxsize=None)
def _resident_blocks(function_ptr: int, threads: int, shared: int, device: int) -> int:
    cp = backend.cupy_module()
    per_sm = ctypes.c_int(0)
    _driver_call("cuOccupancyMaxActiveBlocksPerMultiprocessor", ctypes.byref(per_sm), ctypes.c_void_p(function_ptr),
                 ctypes.c_int(threads), ctypes.c_size_t(shared))
    return max(1, per_sm.value) * cp.cuda.Device().attributes["MultiProcessorCount"]


def resident_blocks(fn, threads: int, shared: int = 0) -> int:
    """How many blocks of `threads` threads (and `shared` bytes of dynamic shared memory) of this kernel the
    whole GPU holds at once: a persistent grid's size."""
    allow_dynamic_shared(fn, shared)
    return _resident_blocks(getattr(fn, "kernel", fn).ptr, int(threads), int(shared), backend.cupy_module().cuda.Device().id)


_SHARED_ALLOWED: dict = {}


def allow_dynamic_shared(fn, nbytes: int):
    """Let the kernel take `nbytes` of dynamic shared memory (beyond 48 KB needs the function's opt-in)."""
    ptr = getattr(fn, "kernel", fn).ptr
    if nbytes > 48 * 1024 and _SHARED_ALLOWED.get(ptr, 0) < nbytes:
        _driver_call("cuFuncSetAttribute", ctypes.c_void_p(ptr), ctypes.c_int(_MAX_DYNAMIC_SHARED), ctypes.c_int(nbytes))
        _SHARED_ALLOWED[ptr] = nbytes


def overlapped_launch_available() -> bool:
    if not backend.cuda_available():
        return False
    cp = backend.cupy_module()
    return (_launch_kernel_ex() is not None and runtime.options().overlapped_launch
            and int(cp.cuda.Device().compute_capability) >= 90)


def launch(fn, grid: tuple, block: tuple, args: tuple, overlap: bool = False, shared: int = 0):
    """Launch a compiled kernel on the current stream, as fn(grid, block, args) does.

    overlap: programmatic dependent launch (sm_90): the kernel may start while the one before it on the
    stream is finishing, so loads that don't depend on it (weights) overlap its tail. The kernel must run
    griddepcontrol.wait before it reads what the kernel before wrote. Stream capture records the
    overlap as a programmatic edge of the graph. Without driver support it is a plain launch."""
    allow_dynamic_shared(fn, shared)
    if not overlap or not overlapped_launch_available():
        fn(grid, block, args, shared_mem=shared)
        return
    cp = backend.cupy_module()
    values = []
    for a in args:
        if isinstance(a, cp.ndarray):
            values.append(ctypes.c_void_p(a.data.ptr))
        else:
            values.append(_SCALAR_ARGS[np.asarray(a).dtype](a))
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared,
                           ctypes.c_void_p(cp.cuda.get_current_stream().ptr), ctypes.pointer(attr), 1)
    status = _launch_kernel_ex()(ctypes.byref(config), ctypes.c_void_p(getattr(fn, "kernel", fn).ptr), params, None)
    if status != 0:
        raise LlamacError(f"cuLaunchKernelEx failed with CUDA error {status}")
