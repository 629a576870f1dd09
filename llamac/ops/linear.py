"""Projections: y = x W^T as one Function, several weights on one input (their input gradients summed
inside the GEMMs, beta=1), and row blocks of one stacked weight read in place (StackedRows)."""
from __future__ import annotations

import numpy as np

from llamac.engine import backend, cublas
from llamac.engine.matmul import matmul
from llamac.engine.ops import Concatenate
from llamac.engine.tensor import Function, Tensor
from llamac.errors import ShapeError


class Linear(Function):
    """x @ W.T (+ b) with W stored (out, in) as in torch; batch dims folded into one GEMM."""

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ShapeError(f"linear: input {x.shape} does not fit weight {w.shape} (in_features {w.shape[1]})")
        self.save(x, w)
        out = matmul(x, w.T)
        return out if b is None else out + b

    def backward(self, g):
        x, w = self.saved
        g2 = g.reshape(-1, g.shape[-1])
        gx = None
        if self.needs_grad[0]:
            group = getattr(self, "group", None)
            if group is not None and group.gx is not None:
                # Another projection of the same input already returned its gx to the engine, which
                # holds that very array as x's gradient: add into it inside the GEMM (beta=1) instead
                # of returning a second array for the engine to add (one pass over (B, T, C) each).
                matmul(g, w, out=group.gx, beta=1.0)
            else:
                gx = matmul(g, w)
                if group is not None:
                    group.gx = gx
            if group is not None:
                group.pending -= 1
                if group.pending == 0:
                    group.gx = None
        gw = None
        if self.needs_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            acc = _accumulable_grad(getattr(self, "inputs", (None, None))[1], w)
            if acc is not None:                 # later micro-steps: add into .grad inside the GEMM
                matmul(g2.T, x2, out=acc, beta=1.0)
            else:
                gw = matmul(g2.T, x2)
        gb = g2.sum(axis=0) if len(self.needs_grad) > 2 else None
        return gx, gw, gb


def _accumulable_grad(param, w):
    """param.grad when a GPU GEMM may add into it in place: a leaf's own contiguous gradient
    array of w's shape and dtype (never a view that another tensor's gradient could share)."""
    grad = getattr(param, "grad", None)
    if (grad is None or param._ctx is not None or backend.get_array_module(grad) is np
            or grad.shape != w.shape or grad.dtype != w.dtype or not grad.flags.c_contiguous
            or grad.base is not None):
        return None
    return grad


# ---------------------------------------------------------------- functional API

def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


class _SharedInput:
    """The projections of one input (q, k, v; gate, up): the first backward's gx, the others add into it."""

    __slots__ = ("gx", "pending")

    def __init__(self, n: int):
        self.gx, self.pending = None, n


def _sums_in_gemm(x: Tensor) -> bool:
    """Whether the GEMMs sum the input gradient in place (beta=1): cuBLAS on the GPU, OpenBLAS's
    sgemm for float32 on the CPU (cpu.matmul; without it, one in-place add instead of the engine's)."""
    if x.xp is np:
        return x.dtype == np.float32
    return cublas.gemm_supported(x.dtype)


def linears(x: Tensor, weights) -> list:
    """[x @ w.T for w in weights]. The backward sums the input gradients inside the GEMMs (beta=1 into
    the first one's array) instead of adding separate arrays.

    x must feed nothing else that needs a gradient (the engine would add that into a new array, and
    the later in-place contributions would be lost): the model passes its RMSNorm outputs, which only
    these projections read."""
    if not _sums_in_gemm(x) or len(weights) < 2:
        return [Linear.apply(x, w) for w in weights]
    group = _SharedInput(len(weights))
    outs = []
    for w in weights:
        out = Linear.apply(x, w)
        if out._ctx is not None and out._ctx.needs_grad[0]:
            out._ctx.group = group
        else:
            group.pending -= 1
        outs.append(out)
    return outs


def _address(a) -> int:
    """Where an array's first element lives (CuPy's device pointer, NumPy's host address)."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]


class StackedRows(Concatenate):
    """Concatenate (axis 0) of arrays that already are consecutive row blocks of one array (the
    model's wq | wk | wv after Attention.after_move): that array, not a copy. The backward is
    Concatenate's, row views of the gradient."""

    @staticmethod
    def adjacent(arrays) -> bool:
        base = arrays[0].base
        if base is None or not base.flags.c_contiguous or base.shape[0] != sum(a.shape[0] for a in arrays):
            return False
        ptr = _address(base)
        for a in arrays:
            if a.base is not base or not a.flags.c_contiguous or _address(a) != ptr:
                return False
            ptr += a.nbytes
        return True

    def forward(self, *arrays, axis=0):
        self.axis, self.sizes = 0, [a.shape[0] for a in arrays]
        return arrays[0].base
