"""Token embedding: a gather forward, a deterministic sorted scatter-add backward (kernels/embedding.cu)."""
from __future__ import annotations

import numpy as np

from llamac.engine import backend
from llamac.engine.ops import compute_dtype, scatter_add
from llamac.engine.tensor import Function, Tensor
from llamac.errors import LlamacError, ShapeError
from llamac.ops.common import THREADS, _cuda_dtype, _on_gpu

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"embedding": ("embedding_backward",)}

# ---------------------------------------------------------------- embedding backward
# dW[v] = sum of dout rows whose id is v, in a fixed order. Kernel: kernels/embedding.cu.

def embedding_backward_reference(ids, dout, num_embeddings):
    """dW (V, C) in dout's dtype, summed in fp32 (fp64 for fp64): np.add.at semantics."""
    xp = backend.get_array_module(dout)
    ct = compute_dtype(dout.dtype)
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


class Embedding(Function):
    """weight[ids]; the backward scatter-adds rows (repeated ids sum)."""

    def forward(self, ids, weight):
        self.save(ids)
        self.shape = weight.shape
        return weight[ids]

    def backward(self, g):
        (ids,) = self.saved
        xp = backend.get_array_module(g)
        if xp is not np and g.dtype in backend.CUDA_TYPES:     # sorted, deterministic: kernels/embedding.cu
            return None, embedding_backward(ids, g, self.shape[0])
        return None, scatter_add(xp, self.shape, ids.reshape(-1), g.reshape(-1, self.shape[1]))


def embedding(ids, weight: Tensor) -> Tensor:
    return Embedding.apply(ids if isinstance(ids, Tensor) else Tensor(ids), weight)
