"""Matrix products: the MatMul Function and matmul on xp arrays (cuBLAS on the GPU, threaded NumPy on the CPU)."""
from __future__ import annotations

import numpy as np

from llamac.engine import backend, cpu, cublas, onednn
from llamac.engine.tensor import Function, unbroadcast
from llamac.errors import ShapeError


class MatMul(Function):
    """Batched matmul with broadcasting over the leading (batch) dimensions."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ShapeError(f"matmul: operands must have at least one dimension, got {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} do not fit (inner dimensions "
                             f"{a.shape[-1]} and {b.shape[-2 if b.ndim > 1 else 0]})")
        self.save(a, b)
        return matmul(a, b)

    def backward(self, g):
        a, b = self.saved
        a2 = a[None, :] if a.ndim == 1 else a           # vectors as (1, K) / (K, 1) matrices
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g
        if a.ndim == 1:
            g2 = g2[..., None, :]
        if b.ndim == 1:
            g2 = g2[..., None]
        ga = matmul(g2, b2.swapaxes(-1, -2)) if self.needs_grad[0] else None
        gb = None
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:            # weight shared across the batch: one GEMM
                gb = matmul(a2.reshape(-1, a2.shape[-1]).swapaxes(-1, -2), g2.reshape(-1, g2.shape[-1]))
            else:
                gb = matmul(a2.swapaxes(-1, -2), g2)
        if ga is not None:
            ga = unbroadcast(ga, a2.shape).reshape(a.shape)
        if gb is not None:
            gb = unbroadcast(gb, b2.shape).reshape(b.shape)
        return ga, gb


def matmul(a, b, out=None, beta: float = 0.0):
    """a @ b on xp arrays (batch dims broadcast). With `out`, the result is written there, plus
    beta * out (beta=1 accumulates a gradient in place: one pass fewer than gemm-then-add).

    GPU: cuBLAS through cublas.gemm for fp32/bf16/fp16/fp64: strided views (transposes,
    attention's head layouts) are read in place, bf16 batches work (CuPy's batched matmul rejects
    them), fp32 accumulation, and the call can be captured in a CUDA graph.
    CPU: NumPy, folding batch dims into rows when b is a matrix (one big GEMM instead of many),
    split over the cores by cpu.matmul; with bf16 products on (runtime cpu_bf16_products), oneDNN
    multiplying in bf16 (cpu_bf16_matmul)."""
    xp = backend.get_array_module(a)
    if xp is not np:
        return _gpu_matmul(xp, a, b, out, beta)
    if a.ndim >= 2 and b.ndim >= 2 and onednn.bf16_products():
        result = cpu_bf16_matmul(a, b, out, beta)
        if result is not None:
            return result
    if a.ndim >= 2 and b.ndim == 2 and a.dtype.kind == "f":
        if out is not None and out.flags.c_contiguous and out.shape == (*a.shape[:-1], b.shape[-1]):
            # into out directly; with beta=1 the sum happens inside the GEMM where sgemm can do it
            cpu.matmul(a.reshape(-1, a.shape[-1]), b, out=out.reshape(-1, b.shape[-1]), beta=beta)
            return out
        result = cpu.matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    elif a.ndim > 2 and b.ndim == 2:
        result = np.matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    else:
        if a.ndim > 2 or b.ndim > 2:
            # NumPy hands a stack of matrices to BLAS only when each is contiguous; a transposed view
            # (attention's q, k, v) falls to a plain C loop ~100x slower than copying first.
            a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        result = np.matmul(a, b)
    return result if out is None else _combine(out, result, beta)


def _combine(out, result, beta):
    """out = result + beta out."""
    if beta == 1:
        out += result
    elif beta:
        out *= out.dtype.type(beta)
        out += result
    else:
        out[...] = result
    return out


def cpu_bf16_matmul(a, b, out=None, beta: float = 0.0):
    """a @ b (+ beta out) multiplied in bf16, accumulated and returned in fp32 (llamac.engine.onednn),
    batch dimensions folded into rows when b is a matrix; None where oneDNN does not take the operands."""
    if b.ndim == 2 and a.ndim > 2:
        into = out is not None and out.flags.c_contiguous and out.shape == (*a.shape[:-1], b.shape[-1])
        folded = cpu_bf16_matmul(a.reshape(-1, a.shape[-1]), b, out.reshape(-1, out.shape[-1]) if into else None,
                                 beta if into else 0.0)
        if folded is None or into:
            return folded if folded is None else out
        folded = folded.reshape(*a.shape[:-1], b.shape[-1])
        return folded if out is None else _combine(out, folded, beta)
    if a.ndim != b.ndim:                               # leading batch dimensions of one, as views
        n = max(a.ndim, b.ndim)
        a, b = a.reshape((1,) * (n - a.ndim) + a.shape), b.reshape((1,) * (n - b.ndim) + b.shape)
    if not onednn.takes(a, b):
        return None
    if out is not None and not onednn.takes(a, b, out):   # out of another dtype: add afterwards
        return _combine(out, cpu_bf16_matmul(a, b), beta)
    if out is None:
        out, beta = np.empty((*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]),
                             np.float32), 0.0
    return onednn.matmul(a, b, out, beta)


def _gpu_matmul(xp, a, b, out, beta):
    if not (cublas.gemm_supported(a.dtype) and cublas.gemm_supported(b.dtype)):
        result = xp.matmul(a, b)                       # integers: not a cuBLAS job
        if out is None:
            return result
        out[...] = result + out * beta if beta else result
        return out
    if a.dtype != b.dtype:
        dt = np.promote_types(a.dtype, b.dtype)
        a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
    vec_a, vec_b = a.ndim == 1, b.ndim == 1
    if vec_a or vec_b:                                 # vectors as (1, K) / (K, 1) matrices
        if out is not None:
            raise ShapeError("matmul: out= needs matrix operands")
        result = cublas.gemm(a[None, :] if vec_a else a, b[:, None] if vec_b else b)
        if vec_b:
            result = result[..., 0]
        if vec_a:
            result = result[..., 0, :] if not vec_b else result[..., 0]
        return result
    return cublas.gemm(a, b, out=out, beta=beta)


# ---------------------------------------------------------------- elementwise unary
