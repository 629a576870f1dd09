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


@functools.lru_cache(maxsize=None)
def compute_capability(device_id: int = 0) -> str:
    """The GPU's compute capability as CuPy spells it ("90" for H100/H200)."""
    return str(cupy_module().cuda.Device(device_id).compute_capability)


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


# ---------------------------------------------------------------- cuBLAS through ctypes
# CuPy's cuBLAS wrappers refuse to run while a stream is being captured into a CUDA graph, and
# CuPy has no batched bf16 matmul. cuBLAS itself does both: called through ctypes on the same
# libcublas CuPy loaded, with our own handle bound to the current stream and a preallocated
# workspace (without one, cuBLAS would allocate inside the capture).

import ctypes  # noqa: E402
import glob as _glob  # noqa: E402
import sys as _sys  # noqa: E402

_CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float16): 2, np.dtype(np.float64): 1}
if bfloat16 is not None:
    _CUDA_R[bfloat16] = 14                      # CUDA_R_16BF
_COMPUTE_32F, _COMPUTE_64F = 68, 70             # CUBLAS_COMPUTE_32F / _64F
_GEMM_DEFAULT = -1                              # tensor cores are used where the types allow
_OP_N, _OP_T = 0, 1
CUBLAS_WORKSPACE_BYTES = 32 << 20               # NVIDIA's recommendation for Hopper


def _find_libcublas():
    """The libcublas CuPy uses: read from the process's mapped libraries after CuPy loaded it,
    else the nvidia-cublas wheel folders on sys.path, else the loader's search path."""
    try:
        import cupy_backends.cuda.libs.cublas  # noqa: F401,PLC0415 - makes CuPy load libcublas
    except Exception:
        pass
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libcublas.so" in path:
                    return path
    except OSError:
        pass
    for root in _sys.path:
        for pattern in ("nvidia/cu*/lib/libcublas.so*", "nvidia/cublas/lib/libcublas.so*"):
            found = sorted(_glob.glob(os.path.join(root, pattern)))
            if found:
                return found[-1]
    found = sorted(_glob.glob("/usr/local/cuda*/lib64/libcublas.so*"))
    if found:
        return found[-1]
    import ctypes.util  # noqa: PLC0415
    return ctypes.util.find_library("cublas") or "libcublas.so"


class _Cublas:
    def __init__(self):
        cp = cupy_module()
        path = _find_libcublas()
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise LlamacError(f"cannot load cuBLAS ({path}): {exc}") from None
        self.lib, self.path = lib, path
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32,
                                     i32, i32, i32]
        lib.cublasGemmStridedBatchedEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, i64, vp, i32,
                                                   i32, i64, vp, vp, i32, i32, i64, i32, i32, i32]
        handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.device = cp.cuda.Device().id
        # Kept for the process's lifetime: a captured graph may point into it.
        self.workspace = cp.empty(CUBLAS_WORKSPACE_BYTES, np.uint8)
        self._check(lib.cublasSetWorkspace_v2(handle, self.workspace.data.ptr, CUBLAS_WORKSPACE_BYTES),
                    "cublasSetWorkspace")
        self.stream = None
        self.scalars = {}
        self._lt = False            # cuBLASLt (llamac.cublaslt), loaded on first use; None if unavailable

    def lt(self):
        if self._lt is False:
            from llamac import cublaslt  # noqa: PLC0415 - only 16-bit GEMMs need it
            try:
                self._lt = cublaslt.CublasLt(self.path, cupy_module(), self.workspace) if cublaslt.ENABLED else None
            except (LlamacError, OSError, AttributeError):
                self._lt = None     # no (usable) libcublasLt beside libcublas: cublasGemmEx for everything
        return self._lt

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise LlamacError(f"{what} failed with cuBLAS status {status}")

    def bind(self, stream_ptr):
        if stream_ptr != self.stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, stream_ptr), "cublasSetStream")
            self.stream = stream_ptr

    def scalar(self, value, double):
        # Host scalars by pointer (pointer mode host): the value is read at the call, and a
        # captured graph keeps the value it had then.
        return ctypes.byref(ctypes.c_double(value) if double else ctypes.c_float(value))


_CUBLAS: dict = {}


def _cublas() -> _Cublas:
    cp = cupy_module()
    dev = cp.cuda.Device().id
    lib = _CUBLAS.get(dev)
    if lib is None:
        lib = _CUBLAS[dev] = _Cublas()
    lib.bind(cp.cuda.get_current_stream().ptr)
    return lib


def _ptr(x) -> int:
    return x.data.ptr


def gemm_supported(dtype) -> bool:
    """Types backend.gemm takes: fp32, bf16, fp16 (fp32 accumulation) and fp64."""
    return np.dtype(dtype) in _CUDA_R


def _matrix_layout(rows, cols, s_rows, s_cols):
    """(op, ld) for a (rows, cols) matrix with element strides, read by cuBLAS as column-major
    storage of its transpose: 'N' when rows are contiguous (row-major), 'T' when columns are
    (a transposed view); None when neither (the caller copies)."""
    if cols == 1 or s_cols == 1:
        ld = s_rows if rows > 1 else cols
        if ld >= max(cols, 1):
            return _OP_N, ld
    if rows == 1 or s_rows == 1:
        ld = s_cols if cols > 1 else rows
        if ld >= max(rows, 1):
            return _OP_T, ld
    return None


def _batch_stride(shape, strides):
    """One element stride that walks all batch dims in order (size-1 dims skipped), or None."""
    stride, expect = 0, None
    for n, s in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if expect is None:
            stride, expect = s, s * n
        elif s == expect:
            expect = s * n
        elif s == 0 and expect == 0:
            pass
        else:
            return None
    return stride if stride >= 0 else None


def gemm(a, b, out=None, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0):
    """out = alpha * op(a) @ op(b) + beta * out on the GPU through cuBLAS (row-major semantics).

    a (..., M, K), b (..., K, N) after the optional transposes of their last two axes; batch dims
    broadcast (a 2-D operand is shared by the whole batch). Any strided view whose matrices have one
    unit stride is read in place (transposes become cuBLAS ops); others are copied first.
    bf16/fp16/fp32 inputs accumulate in fp32. `out` (C-contiguous, (..., M, N), the inputs' dtype,
    or float32 for bf16/fp16 inputs: a sum kept in fp32 across calls) is written in place; with
    beta != 0 it must be given. Capturable in a CUDA graph. Single 16-bit products go through
    cuBLASLt with the fastest of its proposed algorithms for the shape (llamac.cublaslt), the rest
    through cublasGemmEx.
    """
    cp = cupy_module()
    if trans_a:
        a = a.swapaxes(-1, -2)
    if trans_b:
        b = b.swapaxes(-1, -2)
    if a.ndim < 2 or b.ndim < 2:
        raise LlamacError(f"gemm needs matrices, got shapes {a.shape} and {b.shape}")
    dtype = a.dtype
    if b.dtype != dtype or dtype not in _CUDA_R:
        raise LlamacError(f"gemm: operands must share one of {sorted(str(d) for d in _CUDA_R)}, "
                          f"got {a.dtype} and {b.dtype}")
    M, K = a.shape[-2:]
    K2, N = b.shape[-2:]
    if K != K2:
        raise LlamacError(f"gemm: shapes {a.shape} and {b.shape} do not fit (inner dimensions {K} and {K2})")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    count = int(np.prod(batch)) if batch else 1
    if out is None:
        if beta != 0:
            raise LlamacError("gemm with beta != 0 needs out")
        out = cp.empty((*batch, M, N), dtype)
    elif (out.shape != (*batch, M, N) or not out.flags.c_contiguous
          or not (out.dtype == dtype or (out.dtype == np.float32 and dtype.itemsize == 2))):
        raise LlamacError(f"gemm: out must be a C-contiguous {(*batch, M, N)} {dtype} array "
                          f"(or float32 for 16-bit inputs), got {out.shape} {out.dtype}")
    if out.size == 0:
        return out
    if K == 0:                                  # an empty sum: C = beta C
        if beta == 0:
            out.fill(0)
        else:
            out *= out.dtype.type(beta)
        return out
    item = dtype.itemsize

    def operand(x, rows, cols):
        x = cp.broadcast_to(x, (*batch, rows, cols)) if x.shape[:-2] != batch else x
        st = [s // item for s in x.strides]
        layout = _matrix_layout(rows, cols, st[-2], st[-1])
        bstride = _batch_stride(batch, st[:-2]) if batch else 0
        if layout is None or bstride is None:
            x = cp.ascontiguousarray(x)
            st = [s // item for s in x.strides]
            layout, bstride = _matrix_layout(rows, cols, st[-2], st[-1]), (rows * cols if batch else 0)
        return x, layout[0], layout[1], bstride

    a, op_a, ld_a, sb_a = operand(a, M, K)
    b, op_b, ld_b, sb_b = operand(b, K, N)
    # One big GEMM when b is shared and a's batch folds into its rows (Linear on (B, T, C)).
    if count > 1 and sb_b == 0 and op_a == _OP_N and sb_a == M * ld_a:
        M, count, sb_a = M * count, 1, 0
    lib = _cublas()
    double = dtype == np.float64
    compute = _COMPUTE_64F if double else _COMPUTE_32F
    al, be = lib.scalar(alpha, double), lib.scalar(beta, double)
    t, t_out = _CUDA_R[dtype], _CUDA_R[out.dtype]
    # Row-major C = A B is column-major C^T = B^T A^T: b goes first, and each row-major operand
    # is already its own transpose in column-major terms.
    lt = lib.lt() if count == 1 and dtype.itemsize == 2 else None
    if lt is not None and lt.matmul((t, t_out, op_b, op_a, N, M, K, ld_b, ld_a, N), al, _ptr(b), _ptr(a), be, out):
        pass                        # the fastest algorithm cuBLASLt proposes for this shape (llamac.cublaslt)
    elif count == 1:
        status = lib.lib.cublasGemmEx(lib.handle, op_b, op_a, N, M, K, al, _ptr(b), t, ld_b,
                                      _ptr(a), t, ld_a, be, _ptr(out), t_out, N, compute, _GEMM_DEFAULT)
        _Cublas._check(status, "cublasGemmEx")
    else:
        status = lib.lib.cublasGemmStridedBatchedEx(lib.handle, op_b, op_a, N, M, K, al, _ptr(b), t, ld_b,
                                                    sb_b, _ptr(a), t, ld_a, sb_a, be, _ptr(out), t_out, N,
                                                    M * N, count, compute, _GEMM_DEFAULT)
        _Cublas._check(status, "cublasGemmStridedBatchedEx")
    return out


def cublas_library_path() -> str:
    """Where the libcublas that backend.gemm calls was loaded from."""
    return _cublas().path


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


def gpu_memory_info() -> tuple[int, int]:
    """(free, total) device bytes from the driver."""
    return tuple(int(v) for v in cupy_module().cuda.runtime.memGetInfo())
