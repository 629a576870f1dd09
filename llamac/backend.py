"""The one module that owns the array library.

Everything else asks this module for `xp` (NumPy on the CPU, CuPy on the GPU)
and never imports cupy itself, so llamac imports and runs with no CuPy at all.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from llamac.errors import LlamacError

try:  # the bfloat16 NumPy dtype; CuPy 14 uses the same one
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a core dependency
    bfloat16 = None

DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
    "bf16": bfloat16,
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
}

KERNEL_DIR = Path(os.environ.get("LLAMAC_KERNELS", Path(__file__).resolve().parent.parent / "kernels"))


def as_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES or DTYPES[dtype] is None:
            raise LlamacError(f"unknown dtype {dtype!r}; choose one of {sorted(k for k, v in DTYPES.items() if v is not None)}")
        return DTYPES[dtype]
    return np.dtype(dtype)


def is_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == bfloat16


def is_low_precision(dtype) -> bool:
    """bf16 and fp16: stored narrow, computed in fp32 on the CPU."""
    return np.dtype(dtype) in (bfloat16, np.dtype(np.float16))


# ---------------------------------------------------------------- CuPy, lazily

@functools.lru_cache(maxsize=None)
def _cupy_or_reason():
    """(cupy module, None) when a GPU is usable, else (None, why not)."""
    try:
        import cupy  # noqa: PLC0415 - the only cupy import in llamac
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"CuPy is not installed ({type(exc).__name__}); install llamac[cuda12] or llamac[cuda13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy found no usable CUDA driver ({exc})"
    if count < 1:
        return None, "CuPy found no CUDA GPU"
    return cupy, None


def cuda_available() -> bool:
    return _cupy_or_reason()[0] is not None


def cupy_module():
    cp, why = _cupy_or_reason()
    if cp is None:
        raise LlamacError(f"device 'cuda' is not available: {why}")
    return cp


def resolve_device(device: str | None) -> str:
    """'auto' | 'cpu' | 'cuda' -> 'cpu' or 'cuda', with the reason when CUDA can't be had."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        cupy_module()
        return "cuda"
    raise LlamacError(f"unknown device {device!r}; choose cpu, cuda or auto")


def xp_for(device: str):
    return np if device == "cpu" else cupy_module()


def get_array_module(array):
    """numpy or cupy, whichever owns `array` (Chainer's idiom)."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    cp, _ = _cupy_or_reason()
    if cp is not None and isinstance(array, cp.ndarray):
        return cp
    return np


def device_of(array) -> str:
    return "cpu" if get_array_module(array) is np else "cuda"


def to_device(array, device: str):
    if device_of(array) == device:
        return array
    if device == "cpu":
        return array.get()
    return cupy_module().asarray(array)


def to_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else np.asarray(array.get())


def synchronize():
    cp, _ = _cupy_or_reason()
    if cp is not None:
        cp.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------- kernels

CUDA_TYPES = {np.dtype(np.float32): "float", bfloat16: "bf16_t", np.dtype(np.float16): "half_t"}


def kernel_source(name: str) -> str:
    """kernels/common.cuh followed by kernels/NAME.cu: one text for NVRTC, no include paths needed."""
    common = (KERNEL_DIR / "common.cuh").read_text()
    return common + "\n#line 1 \"" + name + ".cu\"\n" + (KERNEL_DIR / f"{name}.cu").read_text()


def kernel_options(dtype, extra=()) -> tuple[str, ...]:
    return ("--std=c++17", f"-DDTYPE={CUDA_TYPES[np.dtype(dtype)]}", *extra)


_KERNEL_CACHE: dict = {}


def get_kernel(name: str, function: str, dtype=np.float32, options=()):
    """A compiled CUDA function from kernels/NAME.cu, cached per source, dtype, device and options."""
    cp = cupy_module()
    source = kernel_source(name)
    opts = kernel_options(dtype, options)
    key = (hashlib.sha1(source.encode()).hexdigest(), function, opts, cp.cuda.Device().id)
    fn = _KERNEL_CACHE.get(key)
    if fn is None:
        module = cp.RawModule(code=source, options=opts)
        fn = _KERNEL_CACHE[key] = module.get_function(function)
    return fn
