"""SwiGLU, silu(gate) * up, and its product with the down projection (SwiGLUDown, which can
recompute silu(gate) * up in the backward instead of keeping it). Kernel: kernels/swiglu.cu."""
from __future__ import annotations

import numpy as np

from llamac import runtime
from llamac.engine import backend, cpu
from llamac.engine.matmul import matmul
from llamac.engine.ops import compute_dtype, sigmoid
from llamac.engine.tensor import Function, Tensor
from llamac.errors import ShapeError
from llamac.ops.common import _check_operands, _fill_out, _launch_config
from llamac.ops.linear import _accumulable_grad, linear

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"swiglu": ("swiglu_forward", "swiglu_backward", "swiglu_backward_recompute",
                      "swiglu_backward_recompute_inplace")}

# ---------------------------------------------------------------- SwiGLU
# The Llama MLP gate: silu(gate) * up, silu(x) = x * sigmoid(x). Kernel: kernels/swiglu.cu.

def swiglu_forward_reference(gate, up):
    """silu(gate) * up, computed in fp32 for fp32/bf16/fp16 inputs and returned in their dtype."""
    xp = backend.get_array_module(gate)
    ct = compute_dtype(gate.dtype)
    g, u = gate.astype(ct, copy=False), up.astype(ct, copy=False)
    out = sigmoid(xp, g)
    out *= g
    out *= u
    return out.astype(gate.dtype, copy=False)


def swiglu_backward_reference(gate, up, dout):
    """(dgate, dup) for out = silu(gate) * up given dout, in fp32 for fp32/bf16/fp16 inputs."""
    xp = backend.get_array_module(gate)
    ct = compute_dtype(gate.dtype)
    g, u, d = gate.astype(ct, copy=False), up.astype(ct, copy=False), dout.astype(ct, copy=False)
    s = sigmoid(xp, g)
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


def swiglu_backward_recompute(gate, up, dout):
    """(dgate, dup, h): swiglu_backward's gradients plus the forward output h = silu(gate) * up,
    recomputed in the same pass (kernels/swiglu.cu) so the forward need not keep h."""
    xp = _check_operands("swiglu_backward_recompute", {"gate": gate, "up": up, "dout": dout}, {})
    if xp is np:
        return (*swiglu_backward_reference(gate, up, dout), swiglu_forward_reference(gate, up))
    dgate, dup, h = xp.empty_like(gate), xp.empty_like(gate), xp.empty_like(gate)
    n = gate.size
    if n:
        with gate.device:
            fn = backend.get_kernel("swiglu", "swiglu_backward_recompute", gate.dtype)
            grid, block = _launch_config(n, (gate, up, dout, dgate, dup, h))
            fn(grid, block, (gate, up, dout, dgate, dup, h, np.int64(n)))
    return dgate, dup, h


def swiglu_backward_recompute_inplace(gate, up, dout):
    """swiglu_backward_recompute written over its operands: gate becomes dgate, up dup, dout h.
    For a caller that owns all three (gate and up recomputed for the backward, dout made for it):
    the pass then needs no new (N, hidden) arrays. Returns (dgate, dup, h), the same arrays."""
    xp = _check_operands("swiglu_backward_recompute_inplace", {"gate": gate, "up": up, "dout": dout}, {})
    if xp is np:
        dgate, dup = swiglu_backward_reference(gate, up, dout)
        dout[...] = swiglu_forward_reference(gate, up)
        gate[...], up[...] = dgate, dup
        return gate, up, dout
    n = gate.size
    if n:
        with gate.device:
            fn = backend.get_kernel("swiglu", "swiglu_backward_recompute_inplace", gate.dtype)
            grid, block = _launch_config(n, (gate, up, dout))
            fn(grid, block, (gate, up, dout, np.int64(n)))
    return gate, up, dout


class SwiGLUDown(Function):
    """silu(gate) * up @ w.T (the Llama MLP after its gate/up projections), GPU.

    Keeps gate and up but not h = silu(gate) * up (B*T*hidden values a layer): the backward
    recomputes h in the SwiGLU backward's own pass (kernels/swiglu.cu) for the weight
    gradient. The weight gradient adds into an existing .grad inside the GEMM, as Linear's does."""

    def forward(self, gate, up, w):
        if gate.shape != up.shape or gate.shape[-1] != w.shape[1]:
            raise ShapeError(f"swiglu_down: gate {gate.shape}, up {up.shape} and weight {w.shape} do not fit")
        h = swiglu_forward(gate, up)
        self.save(gate, up, w)
        return matmul(h, w.T)

    def backward(self, g):
        gate, up, w = self.saved
        dh = matmul(g, w)                                             # (B, T, hidden)
        dgate, dup, h = swiglu_backward_recompute(gate, up, dh)
        del dh
        gw = None
        if self.needs_grad[2]:
            g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
            acc = _accumulable_grad(self.inputs[2] if self.inputs is not None else None, w)
            if acc is not None:
                matmul(g2.T, h2, out=acc, beta=1.0)
            else:
                gw = matmul(g2.T, h2)
        return dgate, dup, gw


def swiglu_down(gate: Tensor, up: Tensor, weight: Tensor) -> Tensor:
    """w(silu(gate) * up) for a bias-free down projection: SwiGLUDown on the GPU (h recomputed in
    the backward), swiglu then linear elsewhere."""
    if (runtime.options().swiglu_recompute and gate.xp is not np and gate.dtype in backend.CUDA_TYPES
            and up.dtype == gate.dtype == weight.dtype and gate.data.flags.c_contiguous
            and up.data.flags.c_contiguous):
        return SwiGLUDown.apply(gate, up, weight)
    return linear(swiglu(gate, up), weight)


# Recompute SwiGLU's output in the backward instead of keeping it (GPU): memory for one extra write.


class SwiGLU(Function):
    """silu(gate) * up. GPU: one fused kernel each way (kernels/swiglu.cu). CPU: the NumPy
    reference in row blocks on every core, keeping sigmoid(gate) for the backward."""

    def forward(self, gate, up):
        if backend.get_array_module(gate) is not np or gate.dtype == np.float64:
            self.save(gate, up, None)
            return swiglu_forward(gate, up)
        g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
        out, sig = np.empty_like(g2), np.empty_like(g2)

        def rows(a, b):
            s = sig[a:b]
            np.negative(g2[a:b], out=s)
            with np.errstate(over="ignore"):     # exp(-x) = inf for x << 0 gives sigmoid 0, as it should
                np.exp(s, out=s)
            s += 1
            np.reciprocal(s, out=s)
            np.multiply(g2[a:b], s, out=out[a:b])
            out[a:b] *= u2[a:b]

        cpu.for_row_blocks(rows, len(g2), g2.size, g2.shape[1] * g2.itemsize)
        self.save(gate, up, sig)
        return out.reshape(gate.shape)

    def backward(self, g):
        gate, up, sig = self.saved
        if sig is None:
            return swiglu_backward(gate, up, g)
        g2, u2, d2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]), g.reshape(-1, g.shape[-1])
        dgate, dup = np.empty_like(g2), np.empty_like(g2)

        def rows(a, b):
            s, silu = sig[a:b], dup[a:b]
            np.multiply(g2[a:b], s, out=silu)          # silu(x) = x s
            dg = dgate[a:b]
            np.subtract(1, s, out=dg)                  # d silu / dx = s + silu (1 - s)
            dg *= silu
            dg += s
            dg *= d2[a:b]
            dg *= u2[a:b]
            silu *= d2[a:b]                            # dup = dout * silu

        cpu.for_row_blocks(rows, len(g2), g2.size, g2.shape[1] * g2.itemsize)
        return dgate.reshape(gate.shape), dup.reshape(up.shape)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return SwiGLU.apply(gate, up)
