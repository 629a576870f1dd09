"""The one module that owns the array library.

Everything else asks this module for `xp` (NumPy on the CPU, CuPy on the GPU)
and never imports cupy itself, so llamac imports and runs with no CuPy at all.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np

from llamac import runtime
from llamac.errors import LlamacError

bfloat16 = np.dtype(ml_dtypes.bfloat16)   # the bfloat16 NumPy dtype; CuPy 14 uses the same one

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

KERNEL_DIR = Path(runtime.options().kernel_dir or Path(__file__).resolve().parents[2] / "kernels")


def as_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LlamacError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
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


@functools.lru_cache(maxsize=None)
def compute_capability(device_id: int = 0) -> str:
    """The GPU's compute capability as CuPy spells it ("90" for H100/H200)."""
    return str(cupy_module().cuda.Device(device_id).compute_capability)


def load_cupy_cublas():
    """Make CuPy load its libcublas, so llamac.engine.cublas finds that same library among the process's."""
    try:
        import cupy_backends.cuda.libs.cublas  # noqa: F401,PLC0415
    except Exception:
        pass


def gpu_count() -> int:
    """CUDA GPUs this process can see (0 without CuPy or a driver)."""
    cp, _ = _cupy_or_reason()
    return int(cp.cuda.runtime.getDeviceCount()) if cp is not None else 0


_DEVICE_INDEX = None     # the GPU use_device chose for this process (None: CuPy's default, 0)


def use_device(index: int):
    """Make GPU `index` this process's device (one data-parallel rank per GPU), before any array
    lives on another one. A process that sees one GPU (CUDA_VISIBLE_DEVICES set per rank) uses it."""
    global _DEVICE_INDEX
    cp = cupy_module()
    count = cp.cuda.runtime.getDeviceCount()
    index = 0 if count == 1 else index
    if not 0 <= index < count:
        raise LlamacError(f"GPU {index} does not exist: this process sees {count} (LOCAL_RANK picks the GPU)")
    cp.cuda.Device(index).use()
    _DEVICE_INDEX = index


def nccl_module():
    """CuPy's NCCL binding (cupy.cuda.nccl), for llamac.dist.nccl. NCCL itself comes from NVIDIA's
    wheel (nvidia-nccl-cu12 / -cu13) when CuPy does not find it: that library is loaded first."""
    cupy_module()
    _preload_nccl_wheel()
    try:
        from cupy.cuda import nccl  # noqa: PLC0415 - CuPy's submodule
    except Exception as exc:
        raise LlamacError(f"CuPy's NCCL binding is unavailable ({type(exc).__name__}: {exc}); "
                          "pip install 'llamac[cuda12-dist]' or 'llamac[cuda13-dist]'") from None
    if not getattr(nccl, "available", True):
        raise LlamacError("CuPy found no NCCL library: pip install nvidia-nccl-cu12 (or -cu13) beside cupy")
    return nccl


@functools.lru_cache(maxsize=None)
def _preload_nccl_wheel():
    import ctypes
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for lib in sorted(Path(root).glob("nccl/lib/libnccl.so*")):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return str(lib)
            except OSError:
                continue
    return None


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
    cp = cupy_module()
    if _DEVICE_INDEX is not None:       # CuPy's current device is per thread: a loader's thread too
        with cp.cuda.Device(_DEVICE_INDEX):
            return cp.asarray(array)
    return cp.asarray(array)


def to_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else np.asarray(array.get())


def gpu_pool_bytes() -> int:
    """Bytes held by CuPy's memory pool (an upper bound on what llamac has live on the GPU)."""
    cp, _ = _cupy_or_reason()
    return int(cp.get_default_memory_pool().total_bytes()) if cp is not None else 0


def release_gpu_memory():
    """Give CuPy's cached blocks back to the driver (before another library allocates)."""
    cp, _ = _cupy_or_reason()
    if cp is not None:
        import gc
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()


def synchronize():
    cp, _ = _cupy_or_reason()
    if cp is not None:
        cp.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------- kernels

CUDA_TYPES = {np.dtype(np.float32): "float", bfloat16: "bf16_t", np.dtype(np.float16): "half_t"}


def kernel_names() -> list[str]:
    """Every kernels/NAME.cu, by NAME."""
    return sorted(path.stem for path in KERNEL_DIR.glob("*.cu"))


def kernel_source(name: str) -> str:
    """kernels/common.cuh followed by kernels/NAME.cu: one text for NVRTC, no include paths needed."""
    path = KERNEL_DIR / f"{name}.cu"
    if not path.is_file():
        raise LlamacError(f"no CUDA kernel {name!r}: {path} does not exist")
    common = (KERNEL_DIR / "common.cuh").read_text()
    # #line makes NVRTC's messages name NAME.cu and its own line numbers, not the concatenation's.
    return common + "\n#line 1 \"" + name + ".cu\"\n" + path.read_text()


def kernel_options(dtype, extra=()) -> tuple[str, ...]:
    dtype = np.dtype(dtype)
    if dtype not in CUDA_TYPES:
        raise LlamacError(f"CUDA kernels take float32, bfloat16 or float16, not {dtype}")
    return ("--std=c++17", f"-DDTYPE={CUDA_TYPES[dtype]}", *extra)


_KERNEL_CACHE: dict = {}


def get_kernel_from_source(source: str, function: str, dtype=np.float32, options=(), arch: str | None = None):
    """A compiled CUDA function from source text (common.cuh must already be in it), cached like get_kernel.

    arch None builds for the GPU at hand through CuPy's RawModule. A named arch ("sm_90a": Hopper's
    wgmma and setmaxnreg, which the plain sm_90 target CuPy picks rejects) is compiled here by
    NVRTC straight to a cubin and loaded as a module; the result is called the same way."""
    cp = cupy_module()
    opts = kernel_options(dtype, options)
    key = (hashlib.sha1(source.encode()).hexdigest(), function, opts, arch, cp.cuda.Device().id)
    fn = _KERNEL_CACHE.get(key)
    if fn is None:
        if arch is None:
            fn = cp.RawModule(code=source, options=opts).get_function(function)
        else:
            module = cp.cuda.function.Module()
            module.load(_cubin(source, opts, arch))
            fn = module.get_function(function)
        _KERNEL_CACHE[key] = fn
    return fn


def _cubin(source: str, options: tuple, arch: str) -> bytes:
    """NVRTC (CuPy's binding) -> cubin for `arch`; a compile error is a LlamacError with NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415 - only with CuPy, like every GPU path

    program = nvrtc.createProgram(source, "kernel.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(program, [*options, "-ftz=true", f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as exc:
            raise LlamacError(f"NVRTC could not compile for {arch}: {exc}\n{nvrtc.getProgramLog(program)}") from None
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


_NAMED_KERNELS: dict = {}


def get_kernel(name: str, function: str, dtype=np.float32, options=(), arch: str | None = None):
    """A compiled CUDA function from kernels/NAME.cu, cached per name, function, dtype, options and device.

    Launchers call this on every launch, so the hit path must not touch the files: reading and
    hashing the source each time cost tens of microseconds per kernel. Edits to a .cu file are
    seen by a new process (or after `_NAMED_KERNELS.clear()`).
    """
    cp = cupy_module()
    key = (name, function, np.dtype(dtype), tuple(options), arch, cp.cuda.Device().id)
    fn = _NAMED_KERNELS.get(key)
    if fn is None:
        fn = _NAMED_KERNELS[key] = get_kernel_from_source(kernel_source(name), function, dtype, options, arch)
    return fn


# ---------------------------------------------------------------- GPU timing

def cuda_event():
    """A CUDA event that can be timed (CuPy's cupy.cuda.Event), for benchmarks outside this module."""
    return cupy_module().cuda.Event()


def elapsed_ms(start, end) -> float:
    """Milliseconds between two recorded events; waits for `end` to complete."""
    end.synchronize()
    return float(cupy_module().cuda.get_elapsed_time(start, end))


# ---------------------------------------------------------------- NVRTC without a GPU
# CuPy's RawModule compiles for the GPU it finds. CI has none, so kernels are
# also compiled directly with NVRTC from the cuda-bindings package (pip:
# cuda-bindings, nvidia-cuda-nvrtc), for an architecture named by hand. An
# sm_XX target runs ptxas too, so bad inline PTX and register-constraint
# mistakes fail here, not first on the GPU.

from typing import NamedTuple  # noqa: E402 - kept in this section, which the kernel work owns

DEFAULT_ARCH = "sm_90"  # H100


class CompileResult(NamedTuple):
    ok: bool
    log: str  # NVRTC's messages: errors and warnings, '' when silent
    ptx: str  # '' when compilation failed


@functools.lru_cache(maxsize=None)
def _nvrtc_or_reason():
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415 - optional, for compile checks only
    except Exception as exc:
        return None, f"cuda.bindings is not importable ({type(exc).__name__}: {exc}); pip install cuda-bindings nvidia-cuda-nvrtc"
    try:
        # The shared library is only looked up on first call.
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:
        return None, f"the NVRTC library could not be loaded ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc"
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return None, f"NVRTC is not usable ({err})"
    return nvrtc, None


def nvrtc_available() -> bool:
    return _nvrtc_or_reason()[0] is not None


def nvrtc_unavailable_reason() -> str | None:
    return _nvrtc_or_reason()[1]


def compile_check(source: str, options=(), arch: str = DEFAULT_ARCH, name: str = "kernel.cu") -> CompileResult:
    """Compile CUDA source with NVRTC for `arch` (sm_90, compute_90, ...) without any GPU.

    Returns a CompileResult rather than raising on a compile error, so callers
    can show the log; raises LlamacError only when NVRTC itself is missing.
    """
    nvrtc, why = _nvrtc_or_reason()
    if nvrtc is None:
        raise LlamacError(f"cannot compile-check CUDA source: {why}")
    ok_code = nvrtc.nvrtcResult.NVRTC_SUCCESS

    def check(result, what):
        if result[0] != ok_code:
            raise LlamacError(f"NVRTC {what} failed: {result[0]}")
        return result[1:] if len(result) > 1 else None

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # A fresh buffer: NVRTC writes into it, and b" " * 1 is CPython's shared one-byte
        # object, so writing into that would turn every b" " in the process into b"\x00".
        log = bytearray(size)
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log = bytes(log).rstrip(b"\x00").decode(errors="replace").strip()
        if status != ok_code:
            return CompileResult(False, log or str(status), "")
        (size,) = check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = bytearray(size)
        check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return CompileResult(True, log, bytes(ptx).rstrip(b"\x00").decode(errors="replace"))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_check_kernel(name: str, dtype=np.float32, arch: str = DEFAULT_ARCH, options=()) -> CompileResult:
    """compile_check of kernels/NAME.cu exactly as get_kernel would build it, for `arch`."""
    return compile_check(kernel_source(name), kernel_options(dtype, options), arch=arch, name=f"{name}.cu")


# ---------------------------------------------------------------- streams and CUDA graphs

def new_graph_pool():
    """A memory pool used only while capturing: memory a graph points into is never handed to other code."""
    return cupy_module().cuda.MemoryPool()


def gpu_pools_bytes(*graph_pools) -> int:
    """Bytes held by CuPy's default pool and the given graph pools (blocks in use plus cached)."""
    cp, _ = _cupy_or_reason()
    if cp is None:
        return 0
    return int(cp.get_default_memory_pool().total_bytes()) + sum(int(p.total_bytes()) for p in graph_pools if p)


_CAPTURE_STREAMS: dict = {}


def capture_graph(fn, pool):
    """Record fn() into a CUDA graph whose allocations come from `pool`; returns (graph, fn's result).

    Nothing runs while recording: graph.launch() runs it, on the stream current then (the legacy
    default stream included). The recording itself happens on a side stream when the current one is
    the default stream (which cannot be captured), ordered after the work already queued.
    Everything stays on one stream outside the capture, so CuPy's per-stream pool arenas never hand
    a block to one stream while another still reads it."""
    cp = cupy_module()
    outer = cp.cuda.get_current_stream()
    stream = outer
    if outer.ptr in (0, 1, 2):      # legacy / per-thread default streams cannot be captured
        # One side stream for every capture: the pool keeps freed blocks per stream, so graphs
        # captured on it reuse each other's scratch memory (they never run at the same time).
        stream = _CAPTURE_STREAMS.get(cp.cuda.Device().id)
        if stream is None:
            stream = _CAPTURE_STREAMS[cp.cuda.Device().id] = cp.cuda.Stream(non_blocking=True)
    stream.wait_event(outer.record())
    with stream, cp.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        try:
            result = fn()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        graph = stream.end_capture()
    return graph, result


def free_cached_gpu_memory():
    """Hand the default pool's unused blocks back to the driver (no gc: cheap)."""
    cp, _ = _cupy_or_reason()
    if cp is not None:
        cp.get_default_memory_pool().free_all_blocks()
