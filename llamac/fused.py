"""Fused neural-network primitives: one Function each, forward and backward side by side.

Each is written once with `xp` (NumPy reference on the CPU, CuPy on the GPU); where a
hand-written CUDA kernel exists it is an explicit branch next to the reference.
Composing these from the basic ops would be correct too, but slower: fewer, larger
array operations and fewer saved intermediates.
"""
from __future__ import annotations

import numpy as np

from llamac import backend, cpu, cpu_ops, cublas, flash, kernels
from llamac.engine import Function, Tensor, grad_enabled
from llamac.errors import ShapeError
from llamac.ops import Concatenate, compute_dtype, matmul, scatter_add


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


class SwiGLUDown(Function):
    """silu(gate) * up @ w.T (the Llama MLP after its gate/up projections), GPU.

    Keeps gate and up but not h = silu(gate) * up (B*T*hidden values a layer): the backward
    recomputes h in the SwiGLU backward's own pass (kernels/swiglu.cu) for the weight
    gradient. The weight gradient adds into an existing .grad inside the GEMM, as Linear's does."""

    def forward(self, gate, up, w):
        if gate.shape != up.shape or gate.shape[-1] != w.shape[1]:
            raise ShapeError(f"swiglu_down: gate {gate.shape}, up {up.shape} and weight {w.shape} do not fit")
        h = kernels.swiglu_forward(gate, up)
        self.save(gate, up, w)
        return matmul(h, w.T)

    def backward(self, g):
        gate, up, w = self.saved
        dh = matmul(g, w)                                             # (B, T, hidden)
        dgate, dup, h = kernels.swiglu_backward_recompute(gate, up, dh)
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
    if (SWIGLU_RECOMPUTE and gate.xp is not np and gate.dtype in backend.CUDA_TYPES
            and up.dtype == gate.dtype == weight.dtype and gate.data.flags.c_contiguous
            and up.data.flags.c_contiguous):
        return SwiGLUDown.apply(gate, up, weight)
    return linear(swiglu(gate, up), weight)


# Recompute SwiGLU's output in the backward instead of keeping it (GPU): memory for one extra write.
SWIGLU_RECOMPUTE = True


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
            return None, kernels.embedding_backward(ids, g, self.shape[0])
        return None, scatter_add(xp, self.shape, ids.reshape(-1), g.reshape(-1, self.shape[1]))


class RMSNorm(Function):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, statistics in fp32.
    On the CPU: cpu_ops.rms_norm_forward/backward (rows split over the cores, L2-sized chunks)."""

    def forward(self, x, weight, eps=1e-5):
        xp = backend.get_array_module(x)
        if xp is not np and x.dtype in backend.CUDA_TYPES and weight.dtype == x.dtype:   # kernels/rmsnorm.cu
            out, rstd = kernels.rmsnorm_forward(x, weight, eps)
            self.save(x, rstd, weight)
            self.gpu = True                                    # saved x, not xhat
            return out
        if xp is np:
            out, state = cpu_ops.rms_norm_forward(x, weight, eps)
            self.save(*state)
            self.on_cpu = True
            return out
        ct = compute_dtype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xhat = xp.empty(x2.shape, ct)
        rstd = xp.empty((len(x2), 1), ct)
        out = xp.empty(x2.shape, x.dtype)

        def rows(a, b):
            xs = x2[a:b].astype(ct, copy=False)
            r = rstd[a:b]
            xp.multiply(xs, xs, out=xhat[a:b])
            xp.mean(xhat[a:b], axis=-1, keepdims=True, out=r)
            r += eps
            xp.sqrt(r, out=r)
            xp.reciprocal(r, out=r)
            xp.multiply(xs, r, out=xhat[a:b])
            out[a:b] = xhat[a:b] * weight

        cpu.for_row_blocks(rows, len(x2), x2.size) if xp is np else rows(0, len(x2))
        self.save(xhat, rstd, weight)
        self.shape = x.shape
        return out.reshape(x.shape)

    def backward(self, g):
        if getattr(self, "on_cpu", False):
            return cpu_ops.rms_norm_backward(g, *self.saved)
        xhat, rstd, weight = self.saved
        if getattr(self, "gpu", False):                        # kernels/rmsnorm.cu (xhat is x here)
            dx, dw = kernels.rmsnorm_backward(g, xhat, weight, rstd)
            return dx, dw.astype(weight.dtype, copy=False)
        xp = backend.get_array_module(g)
        g2 = g.reshape(-1, g.shape[-1])
        gx = xp.empty(g2.shape, g.dtype)
        partial_gw = {}                       # weight gradient per row block, summed below

        def rows(a, b):
            gf = g2[a:b].astype(xhat.dtype, copy=False)
            xh = xhat[a:b]
            partial_gw[a] = (gf * xh).sum(axis=0)
            gxhat = gf * weight
            dot = (gxhat * xh).mean(axis=-1, keepdims=True)
            gxhat -= xh * dot
            gxhat *= rstd[a:b]
            gx[a:b] = gxhat

        cpu.for_row_blocks(rows, len(g2), g2.size) if xp is np else rows(0, len(g2))
        gw = sum(partial_gw[a] for a in sorted(partial_gw))
        return gx.reshape(self.shape), gw.astype(weight.dtype, copy=False)


class _ResidualSum(Function):
    """s = x + h, computed by kernels/add_rmsnorm.cu together with the RMSNorm of s (_NormOfSum).

    The backward is Add's (the gradient of s to both inputs), except that the paired norm node may
    already have folded the gradient s received from the next residual add into its own dx (one pass
    instead of a norm backward plus an add): then that sum is what flows on."""

    def backward(self, g):
        state = self.state
        prev = self.inputs[0]._ctx if self.inputs is not None else None
        if state.dx is not None:
            if g is not state.g_res:
                # s had another consumer whose gradient the engine added after the norm folded in
                # g_res: put the norm's share back on top (never happens in the model; kept exact
                # up to one rounding).
                ct = compute_dtype(g.dtype)
                g = (g.astype(ct) - state.g_res.astype(ct) + state.dx.astype(ct)).astype(g.dtype)
            else:
                g = state.dx
        state.g_res = state.dx = None
        if isinstance(prev, _ResidualSum):
            # The residual gradient of our input x, which x's own norm node can fold in (if x has no
            # other consumer, this is exactly what the engine will hold as x's gradient).
            prev.state.g_res = g
        return g, g


class _NormOfSum(Function):
    """y = rmsnorm(s) * w for the s of a _ResidualSum; its backward adds the residual gradient of s
    (when one has arrived) into dx in the same kernel, and hands the engine no second array."""

    def backward(self, g):
        s, rstd, w = self.saved
        state = self.state
        res = state.g_res
        dx, dw = kernels.add_rmsnorm_backward(g, s, w, rstd, dres=res)
        dw = dw.astype(w.dtype, copy=False)
        if res is None:
            return dx, dw
        state.dx = dx               # taken by the _ResidualSum node of s, which runs after us
        return None, dw


class _SumState:
    __slots__ = ("g_res", "dx")

    def __init__(self):
        self.g_res = self.dx = None


def _record(fn, inputs, out: Tensor):
    """Attach a Function node computed outside Function.apply (a kernel with two outputs)."""
    fn.inputs = inputs
    fn.needs_grad = tuple(t.requires_grad for t in inputs)
    out._ctx = fn


def use_fused_residual(x, weight) -> bool:
    """Whether add_rms_norm takes the fused kernel for these operands (GPU, one kernel dtype)."""
    data = x.data if isinstance(x, Tensor) else x
    return (backend.get_array_module(data) is not np and data.dtype in backend.CUDA_TYPES
            and weight.dtype == data.dtype and data.shape[-1] <= kernels.RMSNORM_MAX_C)


def add_rms_norm(x: Tensor, h: Tensor, weight: Tensor, eps: float = 1e-5):
    """(s, n): the residual stream s = x + h and n = rms_norm(s, weight, eps), as two tensors.

    GPU: one kernel forward (kernels/add_rmsnorm.cu) and one backward that also adds the gradient s
    receives from the next residual add. CPU (and anything the kernel does not take): x + h, rms_norm."""
    if not (use_fused_residual(x, weight) and h.dtype == x.dtype and h.shape == x.shape
            and backend.get_array_module(h.data) is x.xp):
        s = x + h
        return s, rms_norm(s, weight, eps)
    s_arr, y, rstd = kernels.add_rmsnorm_forward(x.data, h.data, weight.data, eps)
    record = grad_enabled()
    state = _SumState()
    s = Tensor(s_arr, requires_grad=record and (x.requires_grad or h.requires_grad))
    if s.requires_grad:
        fs = _ResidualSum()
        fs.state = state
        _record(fs, (x, h), s)
    n = Tensor(y, requires_grad=record and (s.requires_grad or weight.requires_grad))
    if n.requires_grad:
        fn = _NormOfSum()
        fn.state = state
        fn.save(s_arr, rstd, weight.data)
        _record(fn, (s, weight), n)
    return s, n


class RoPE(Function):
    """Rotary embedding on (B, T, H, hs) with Meta's interleaved pairing: dims (2i, 2i+1) rotate
    by angle pos * freq_i. cos/sin are (T, hs/2)."""

    def forward(self, x, cos, sin):
        B, T, H, hs = x.shape
        if cos.shape != (T, hs // 2):
            raise ShapeError(f"rope: cos/sin {cos.shape} do not fit input {x.shape} (want {(T, hs // 2)})")
        self.save(cos, sin)
        if backend.get_array_module(x) is not np and x.dtype in backend.CUDA_TYPES:    # kernels/rope.cu
            return kernels.rope_forward(x, cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    def backward(self, g):
        cos, sin = self.saved
        if backend.get_array_module(g) is not np and g.dtype in backend.CUDA_TYPES:
            return kernels.rope_backward(g, cos, sin), None, None
        return _rotate(g, cos, sin, sign=-1.0), None, None


def _rotate(x, cos, sin, sign):
    if backend.get_array_module(x) is np and x.dtype in (np.float32, np.float64):
        return cpu_ops.rotate_pairs(x, cos, sin, sign)
    return kernels.rope_reference(x, cos, sin, sign)


class SwiGLU(Function):
    """silu(gate) * up. GPU: one fused kernel each way (kernels/swiglu.cu). CPU: the NumPy
    reference in row blocks on every core, keeping sigmoid(gate) for the backward."""

    def forward(self, gate, up):
        if backend.get_array_module(gate) is not np or gate.dtype == np.float64:
            self.save(gate, up, None)
            return kernels.swiglu_forward(gate, up)
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
            return kernels.swiglu_backward(gate, up, g)
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


class Attention(Function):
    """Causal grouped-query attention, softmax(q k^T / sqrt(hs) + bias) v.

    q: (B, Tq, H, hs); k, v: (B, Tk, Hkv, hs) with H a multiple of Hkv. Queries are the last Tq
    of the Tk positions (KV-cache decoding). `bias` is the additive mask from `attention_bias`
    (0 where a key is visible, -inf elsewhere), shared by every layer of a forward pass.
    Returns (B, Tq, H, hs). The reference keeps the (Tq, Tk) probabilities for the backward.
    """

    def forward(self, q, k, v, bias=None):
        B, Tq, H, hs = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hs or H % Hkv:
            raise ShapeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
        xp = backend.get_array_module(q)
        if xp is np:
            self.on_cpu = True
            out, state = cpu_ops.attention_forward(q, k, v, bias)
            self.save(*state)
            return out
        G = H // Hkv
        qg = q.reshape(B, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4)      # (B, Hkv, G, Tq, hs)
        kt = k.transpose(0, 2, 3, 1)[:, :, None]                        # (B, Hkv, 1, hs, Tk)
        vt = v.transpose(0, 2, 1, 3)[:, :, None]                        # (B, Hkv, 1, Tk, hs)
        acc = compute_dtype(q.dtype)
        scale = acc.type(1.0 / np.sqrt(hs))
        scores = matmul(qg, kt).astype(acc, copy=False)                 # (B, Hkv, G, Tq, Tk)
        scores *= scale
        if bias is not None:
            scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = xp.exp(scores, out=scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = matmul(probs.astype(q.dtype, copy=False), vt)              # (B, Hkv, G, Tq, hs)
        self.save(qg, kt, vt, probs)
        self.dims = (B, Tq, Tk, H, Hkv, G, hs, scale)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, hs)

    def backward(self, g):
        if getattr(self, "on_cpu", False):
            return (*cpu_ops.attention_backward(g, *self.saved), None)
        qg, kt, vt, probs = self.saved
        B, Tq, Tk, H, Hkv, G, hs, scale = self.dims
        dt = qg.dtype
        go = g.reshape(B, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4)      # (B, Hkv, G, Tq, hs)
        p = probs.astype(dt, copy=False)
        dv = matmul(p.swapaxes(-1, -2), go).sum(axis=2)                 # (B, Hkv, Tk, hs)
        dp = matmul(go, vt.swapaxes(-1, -2)).astype(probs.dtype, copy=False)
        dp -= (dp * probs).sum(axis=-1, keepdims=True)
        dp *= probs
        dp *= scale
        ds = dp.astype(dt, copy=False)
        dq = matmul(ds, kt.swapaxes(-1, -2))                            # (B, Hkv, G, Tq, hs)
        dk = matmul(ds.swapaxes(-1, -2), qg).sum(axis=2)                # (B, Hkv, Tk, hs)
        dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, hs)
        return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None


def attention_bias(xp, Tq: int, Tk: int, segments=None, causal: bool = True, dtype=np.float32):
    """Additive mask, (B or 1, 1, 1, Tq, Tk): 0 where key j is visible to query i (at position
    Tk - Tq + i: causal, same document), -inf elsewhere. None when everything is visible."""
    # One query (a decode step) sees every earlier key: causality masks nothing there.
    visible = flash.visible_mask(xp, Tq, Tk, causal and Tq > 1, segments)  # (B or 1, 1, Tq, Tk)
    if visible is None:
        return None
    # where(), not bias[~visible] = -inf: boolean-mask assignment counts the mask on the host,
    # a synchronisation that a CUDA graph capture cannot contain.
    ct = compute_dtype(dtype)
    bias = xp.where(visible, ct.type(0), ct.type(-np.inf)).astype(ct, copy=False)
    return bias[:, None]


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


def embedding(ids, weight: Tensor) -> Tensor:
    return Embedding.apply(ids if isinstance(ids, Tensor) else Tensor(ids), weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return RMSNorm.apply(x, weight, eps=eps)


def rope(x: Tensor, cos, sin) -> Tensor:
    cos = cos if isinstance(cos, Tensor) else Tensor(cos)
    sin = sin if isinstance(sin, Tensor) else Tensor(sin)
    return RoPE.apply(x, cos, sin)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return SwiGLU.apply(gate, up)


# Route bf16/fp16 GPU attention through the flash kernel (llamac/flash.py); False forces the
# reference Attention with its T x T bias everywhere (tests compare the two).
FLASH_ATTENTION = True


def use_flash(x, head_dim: int) -> bool:
    """Whether attention on arrays like `x` (a Tensor or array) with this head size takes the flash path."""
    data = x.data if isinstance(x, Tensor) else x
    return (FLASH_ATTENTION and backend.get_array_module(data) is not np
            and data.dtype in (backend.bfloat16, np.dtype(np.float16)) and head_dim in flash.HEAD_DIMS)


class RoPEFlashAttention(Function):
    """Attention over one packed projection, RoPE included (GPU, bf16/fp16, no KV cache).

    qkv (B, T, (H + 2 Hkv) hs) holds q | k | v side by side: one GEMM against the stacked
    wq | wk | wv, larger and faster than three (the narrow k and v products run far below the
    tensor cores' rate), whose input gradient needs no accumulation either. The forward rotates
    q and k out of the packed rows (the RoPE kernel reads them in place) and runs the flash
    forward on them and v, read in place too (the engine keeps qkv, this Function's input, until
    the backward anyway). The backward writes dq, dk, dv straight into one packed gradient, with
    RoPE's backward folded into the flash backward's stores."""

    def forward(self, qkv, cos, sin, n_heads, n_kv_heads, causal=True, segments=None):
        B, T, W = qkv.shape
        H, Hkv = n_heads, n_kv_heads
        hs = W // (H + 2 * Hkv)
        if hs * (H + 2 * Hkv) != W:
            raise ShapeError(f"packed attention: width {W} is not (n_heads + 2 n_kv_heads) = {H + 2 * Hkv} heads")
        q, k, v = _unpack(qkv, H, Hkv, hs)
        qr, kr = kernels.rope_forward(q, cos, sin), kernels.rope_forward(k, cos, sin)
        out, lse = flash.flash_attention_forward(qr, kr, v, causal=causal, segments=segments)
        self.save(qr, kr, v, out, lse, cos, sin)
        self.mask = (bool(causal), segments)
        return out                                                       # (B, T, H, hs)

    def backward(self, g):
        from llamac.flash_backward import flash_attention_backward  # noqa: PLC0415 - as FlashAttention does
        qr, kr, v, out, lse, cos, sin = self.saved
        causal, segments = self.mask
        B, T, H, hs = qr.shape
        Hkv = kr.shape[2]
        dqkv = backend.get_array_module(g).empty((B, T, (H + 2 * Hkv) * hs), qr.dtype)
        flash_attention_backward(qr, kr, v, out, g, lse, causal, segments, rope=(cos, sin),
                                 grads_out=_unpack(dqkv, H, Hkv, hs))
        return dqkv, None, None


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


def _unpack(qkv, H: int, Hkv: int, hs: int):
    """Views q (B, T, H, hs), k and v (B, T, Hkv, hs) of a packed (B, T, (H + 2 Hkv) hs) array."""
    B, T, _ = qkv.shape
    return (qkv[..., : H * hs].reshape(B, T, H, hs), qkv[..., H * hs: (H + Hkv) * hs].reshape(B, T, Hkv, hs),
            qkv[..., (H + Hkv) * hs:].reshape(B, T, Hkv, hs))


# GPU flash path: q, k, v from one stacked GEMM, RoPE's backward folded into the attention kernel
# (RoPEFlashAttention). False keeps three projections, the RoPE Function and FlashAttention.
PACKED_QKV = True


def use_packed_attention(x: Tensor, head_dim: int) -> bool:
    return PACKED_QKV and use_flash(x, head_dim)


def packed_attention(x: Tensor, weights, cos, sin, n_heads: int, n_kv_heads: int, segments=None,
                     causal: bool = True) -> Tensor:
    """attention(rope(x wq^T), rope(x wk^T), x wv^T) through one GEMM with the stacked weights
    (rows wq | wk | wv: the model's one array when they are its row blocks, else a small copy
    each call) and RoPEFlashAttention. -> (B, T, H, hs)."""
    w = (StackedRows if StackedRows.adjacent([t.data for t in weights]) else Concatenate).apply(*weights, axis=0)
    qkv = linear(x, w)                                                  # (B, T, (H + 2 Hkv) hs)
    cos = cos if isinstance(cos, Tensor) else Tensor(cos)
    sin = sin if isinstance(sin, Tensor) else Tensor(sin)
    seg = segments.data if isinstance(segments, Tensor) else segments
    return RoPEFlashAttention.apply(qkv, cos, sin, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal,
                                    segments=seg)


def attention(q: Tensor, k: Tensor, v: Tensor, segments=None, causal: bool = True, bias=None) -> Tensor:
    """Attention with a causal and/or document mask; pass `bias` (from attention_bias) to reuse one.

    On the GPU in bf16/fp16 with a head size in flash.HEAD_DIMS (32, 48, 64, 96, 128) and no
    `bias`, the flash kernel: no (Tq, Tk) mask or probabilities are ever built."""
    seg = segments.data if isinstance(segments, Tensor) else segments
    if bias is None and k.dtype == q.dtype == v.dtype and use_flash(q, q.shape[-1]):
        return flash.FlashAttention.apply(q, k, v, causal=causal, segments=seg)
    if bias is None:
        bias = attention_bias(q.xp, q.shape[1], k.shape[1], seg, causal, q.dtype)
    if bias is None:
        return Attention.apply(q, k, v)
    return Attention.apply(q, k, v, bias if isinstance(bias, Tensor) else Tensor(bias))
