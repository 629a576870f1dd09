"""cuBLAS through ctypes: the GPU matrix products (`gemm`), capturable in CUDA graphs.

CuPy's cuBLAS wrappers refuse to run while a stream is being captured into a CUDA graph, and
CuPy has no batched bf16 matmul. cuBLAS itself does both: called through ctypes on the same
libcublas CuPy loaded, with our own handle bound to the current stream and a preallocated
workspace (without one, cuBLAS would allocate inside the capture).

Nothing here imports cupy: llamac.engine.backend hands it out.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np

from llamac import runtime
from llamac.engine import backend
from llamac.errors import LlamacError

_CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float16): 2, np.dtype(np.float64): 1,
           backend.bfloat16: 14}                # CUDA_R_16BF
_COMPUTE_32F, _COMPUTE_64F = 68, 70             # CUBLAS_COMPUTE_32F / _64F
_GEMM_DEFAULT = -1                              # tensor cores are used where the types allow
_OP_N, _OP_T = 0, 1
CUBLAS_WORKSPACE_BYTES = 32 << 20               # NVIDIA's recommendation for Hopper


def _find_libcublas():
    """The libcublas CuPy uses: read from the process's mapped libraries after CuPy loaded it,
    else the nvidia-cublas wheel folders on sys.path, else the loader's search path."""
    backend.load_cupy_cublas()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libcublas.so" in path:
                    return path
    except OSError:
        pass
    for root in sys.path:
        for pattern in ("nvidia/cu*/lib/libcublas.so*", "nvidia/cublas/lib/libcublas.so*"):
            found = sorted(glob.glob(os.path.join(root, pattern)))
            if found:
                return found[-1]
    found = sorted(glob.glob("/usr/local/cuda*/lib64/libcublas.so*"))
    if found:
        return found[-1]
    import ctypes.util  # noqa: PLC0415
    return ctypes.util.find_library("cublas") or "libcublas.so"


class _Cublas:
    def __init__(self):
        cp = backend.cupy_module()
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
        self._lt = False            # cuBLASLt (llamac.engine.cublaslt), loaded on first use; None if unavailable

    def lt(self):
        if self._lt is False:
            from llamac.engine import cublaslt  # noqa: PLC0415 - only 16-bit GEMMs need it
            try:
                cp = backend.cupy_module()
                self._lt = cublaslt.CublasLt(self.path, cp, self.workspace) if runtime.options().gemm_autotune else None
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
    cp = backend.cupy_module()
    dev = cp.cuda.Device().id
    lib = _CUBLAS.get(dev)
    if lib is None:
        lib = _CUBLAS[dev] = _Cublas()
    lib.bind(cp.cuda.get_current_stream().ptr)
    return lib


def _ptr(x) -> int:
    return x.data.ptr


def gemm_supported(dtype) -> bool:
    """Types gemm takes: fp32, bf16, fp16 (fp32 accumulation) and fp64."""
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
    cuBLASLt with the fastest of its proposed algorithms for the shape (llamac.engine.cublaslt), the rest
    through cublasGemmEx.
    """
    cp = backend.cupy_module()
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
        pass                        # the fastest algorithm cuBLASLt proposes for this shape (llamac.engine.cublaslt)
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
