"""Attention: softmax(q k^T / sqrt(hs) + mask) v with grouped-query heads, causal and document masks.

The plain Function (reference on any xp, CPU path in row blocks) and the GPU flash path (llamac.ops.flash_forward
and flash_backward), chosen in one place (use_flash); the packed path takes q | k | v from one GEMM
with RoPE's backward folded into the flash backward."""
from __future__ import annotations

import numpy as np

from llamac import runtime
from llamac.engine import backend, cpu, onednn
from llamac.engine.matmul import matmul
from llamac.engine.ops import Concatenate, compute_dtype
from llamac.engine.tensor import Function, Tensor
from llamac.errors import ShapeError
from llamac.ops import flash_forward, rope
from llamac.ops.flash_backward import flash_attention_backward
from llamac.ops.flash_forward import flash_attention_forward
from llamac.ops.linear import StackedRows, linear


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
            out, state = attention_forward(q, k, v, bias)
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
            return (*attention_backward(g, *self.saved), None)
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
    visible = flash_forward.visible_mask(xp, Tq, Tk, causal and Tq > 1, segments)  # (B or 1, 1, Tq, Tk)
    if visible is None:
        return None
    # where(), not bias[~visible] = -inf: boolean-mask assignment counts the mask on the host,
    # a synchronisation that a CUDA graph capture cannot contain.
    ct = compute_dtype(dtype)
    bias = xp.where(visible, ct.type(0), ct.type(-np.inf)).astype(ct, copy=False)
    return bias[:, None]




def use_flash(x, head_dim: int) -> bool:
    """Whether attention on arrays like `x` (a Tensor or array) with this head size takes the flash path."""
    data = x.data if isinstance(x, Tensor) else x
    return (runtime.options().flash_attention and backend.get_array_module(data) is not np
            and data.dtype in (backend.bfloat16, np.dtype(np.float16)) and head_dim in flash_forward.HEAD_DIMS)


class RoPEFlashAttention(Function):
    """Attention over one packed projection, RoPE included (GPU, bf16/fp16, no KV cache).

    qkv (B, T, (H + 2 Hkv) hs) holds q | k | v side by side: one GEMM against the stacked
    wq | wk | wv, larger and faster than three (the narrow k and v products run far below the
    tensor cores' rate), whose input gradient needs no accumulation either. The forward rotates
    q and k out of the packed rows (the RoPE kernel reads them in place) and runs the flash
    forward on them and v, read in place too. It keeps qkv (the engine keeps this Function's
    input until the backward anyway), not the rotated copies: the backward rotates q and k again,
    two elementwise passes, rather than holding (H + Hkv) hs more values per token per layer from
    forward to backward. The backward writes dq, dk, dv straight into one packed gradient, with
    RoPE's backward folded into the flash backward's stores."""

    def forward(self, qkv, cos, sin, n_heads, n_kv_heads, causal=True, segments=None):
        B, T, W = qkv.shape
        H, Hkv = n_heads, n_kv_heads
        hs = W // (H + 2 * Hkv)
        if hs * (H + 2 * Hkv) != W:
            raise ShapeError(f"packed attention: width {W} is not (n_heads + 2 n_kv_heads) = {H + 2 * Hkv} heads")
        q, k, v = _unpack(qkv, H, Hkv, hs)
        qr, kr = rope.rope_forward(q, cos, sin), rope.rope_forward(k, cos, sin)
        out, lse = flash_forward.flash_attention_forward(qr, kr, v, causal=causal, segments=segments)
        self.save(qkv, out, lse, cos, sin)
        self.mask, self.heads = (bool(causal), segments), (H, Hkv, hs)
        return out                                                       # (B, T, H, hs)

    def backward(self, g):
        qkv, out, lse, cos, sin = self.saved
        causal, segments = self.mask
        H, Hkv, hs = self.heads
        B, T = qkv.shape[:2]
        q, k, v = _unpack(qkv, H, Hkv, hs)
        qr, kr = rope.rope_forward(q, cos, sin), rope.rope_forward(k, cos, sin)    # the forward's very values
        dqkv = backend.get_array_module(g).empty((B, T, (H + 2 * Hkv) * hs), qr.dtype)
        flash_attention_backward(qr, kr, v, out, g, lse, causal, segments, rope=(cos, sin),
                                 grads_out=_unpack(dqkv, H, Hkv, hs))
        return dqkv, None, None


def _unpack(qkv, H: int, Hkv: int, hs: int):
    """Views q (B, T, H, hs), k and v (B, T, Hkv, hs) of a packed (B, T, (H + 2 Hkv) hs) array."""
    B, T, _ = qkv.shape
    return (qkv[..., : H * hs].reshape(B, T, H, hs), qkv[..., H * hs: (H + Hkv) * hs].reshape(B, T, Hkv, hs),
            qkv[..., (H + Hkv) * hs:].reshape(B, T, Hkv, hs))




def use_packed_attention(x: Tensor, head_dim: int) -> bool:
    return runtime.options().packed_qkv and use_flash(x, head_dim)


def stacked_weight(weights) -> Tensor:
    """wq | wk | wv as one (rows stacked) weight: the model's one array when they are its row
    blocks (FusedAttention.after_move), else a small copy each call."""
    return (StackedRows if StackedRows.adjacent([t.data for t in weights]) else Concatenate).apply(*weights, axis=0)


def packed_attention(x: Tensor, weights, cos, sin, n_heads: int, n_kv_heads: int, segments=None,
                     causal: bool = True) -> Tensor:
    """attention(rope(x wq^T), rope(x wk^T), x wv^T) through one GEMM with the stacked weights
    and RoPEFlashAttention. -> (B, T, H, hs)."""
    qkv = linear(x, stacked_weight(weights))                            # (B, T, (H + 2 Hkv) hs)
    return packed_qkv_attention(qkv, cos, sin, n_heads, n_kv_heads, segments, causal)


def packed_qkv_attention(qkv: Tensor, cos, sin, n_heads: int, n_kv_heads: int, segments=None,
                         causal: bool = True) -> Tensor:
    """RoPEFlashAttention on a packed q | k | v projection (B, T, (H + 2 Hkv) hs). -> (B, T, H, hs)."""
    cos = cos if isinstance(cos, Tensor) else Tensor(cos)
    sin = sin if isinstance(sin, Tensor) else Tensor(sin)
    seg = segments.data if isinstance(segments, Tensor) else segments
    return RoPEFlashAttention.apply(qkv, cos, sin, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal,
                                    segments=seg)


class FlashAttention(Function):
    """softmax(q k^T / sqrt(hs) + mask) v with a causal and/or document mask, no T x T anything.

    forward(q, k, v, causal=True, segments=None): q (B, Tq, H, hs), k, v (B, Tk, Hkv, hs),
    segments (B, Tk) int array or None. Kernels: llamac.ops.flash_forward and flash_backward.
    """

    def forward(self, q, k, v, causal=True, segments=None):
        out, lse = flash_attention_forward(q, k, v, causal=causal, segments=segments)
        self.save(q, k, v, out, lse)
        self.mask = (bool(causal), segments)
        return out

    def backward(self, g):
        q, k, v, out, lse = self.saved
        causal, segments = self.mask
        return flash_attention_backward(q, k, v, out, g, lse, causal, segments)


def flash_attention(q, k, v, causal: bool = True, segments=None):
    """FlashAttention on Tensors (segments: a (B, Tk) int array or Tensor, or None)."""
    seg = segments.data if isinstance(segments, Tensor) else segments
    return FlashAttention.apply(q, k, v, causal=causal, segments=seg)


def mask_for(x: Tensor, head_dim: int, Tq: int, Tk: int, segments=None) -> dict:
    """The causal (and document) mask of a forward, as attention()'s keyword arguments: flash masks
    as it goes, so nothing is built; else one (Tq, Tk) bias, made once and shared by every layer."""
    if use_flash(x, head_dim):
        return {"causal": True, "segments": segments}
    bias = attention_bias(x.xp, Tq, Tk, segments, causal=True, dtype=x.dtype)
    return {"bias": Tensor(bias) if bias is not None else None, "causal": bias is not None}


def attention(q: Tensor, k: Tensor, v: Tensor, segments=None, causal: bool = True, bias=None) -> Tensor:
    """Attention with a causal and/or document mask; pass `bias` (from attention_bias) to reuse one.

    On the GPU in bf16/fp16 with a head size in flash_forward.HEAD_DIMS (32, 48, 64, 96, 128) and no
    `bias`, the flash kernel: no (Tq, Tk) mask or probabilities are ever built."""
    seg = segments.data if isinstance(segments, Tensor) else segments
    if bias is None and k.dtype == q.dtype == v.dtype and use_flash(q, q.shape[-1]):
        return FlashAttention.apply(q, k, v, causal=causal, segments=seg)
    if bias is None:
        bias = attention_bias(q.xp, q.shape[1], k.shape[1], seg, causal, q.dtype)
    if bias is None:
        return Attention.apply(q, k, v)
    return Attention.apply(q, k, v, bias if isinstance(bias, Tensor) else Tensor(bias))


# ---------------------------------------------------------------- attention

def attention_forward(q, k, v, bias):
    """The CPU attention: a batch row or two at a time (their scores stay in the L2 cache), the rows split
    over the cores. Scores are kept transposed, keys down the rows, (Hkv, G, Tk, Tq): the softmax
    reductions over keys then run across whole rows (vectorised) instead of along short ones, and
    every matmul operand is row-major (NumPy/OpenBLAS is up to 3x slower on some transposed ones).
    1/sqrt(hs) is folded into the copy of q. Saves the (transposed) probabilities for the backward."""
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dt = q.dtype
    k, v = k.astype(dt, copy=False), v.astype(dt, copy=False)
    scale = dt.type(1.0 / np.sqrt(hs))
    biasT = None if bias is None else np.ascontiguousarray(bias[:, 0, 0].swapaxes(-1, -2), dtype=dt)  # (Bb, Tk, Tq)
    out = np.empty((B, Tq, H, hs), dt)
    P = np.empty((B, Hkv, G, Tk, Tq), dt)            # probabilities, transposed
    ones = np.ones(Tk, dt)

    c = _batch_rows_per_step(P)
    product = _products(dt)

    def rows(a, b):
        qsT = np.empty((c, Hkv, G, hs, Tq), dt)
        for i in range(a, b, c):
            j = min(i + c, b)
            n = j - i
            np.multiply(q[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 4, 1), scale, out=qsT[:n])
            s = P[i:j]
            product(k[i:j].transpose(0, 2, 1, 3)[:, :, None], qsT[:n], out=s)      # (n, Hkv, G, Tk, Tq)
            if biasT is not None:
                s += biasT[i:j, None, None] if len(biasT) > 1 else biasT[0]
            s -= s.max(axis=3, keepdims=True)
            np.exp(s, out=s)
            r = np.matmul(ones, s)                                             # column sums, (n, Hkv, G, Tq)
            np.reciprocal(r, out=r)
            s *= r[..., None, :]                                               # P, normalised per query
            product(s.swapaxes(-1, -2), v[i:j].transpose(0, 2, 1, 3)[:, :, None],
                    out=out[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4))

    cpu.for_row_blocks(rows, B, P.size)
    return out, (q, k, v, out, P)


def attention_backward(g, q, k, v, out, P):
    """With dO' = dO / sqrt(hs) and D' = rowsum(dO' O): dS' = P (dO' V^T - D') is the score
    gradient already scaled by 1/sqrt(hs), so dQ = dS' K and dK = dS'^T Q take the unscaled q and
    k; dV = P^T dO reads dO in place."""
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dt = q.dtype
    scale = dt.type(1.0 / np.sqrt(hs))
    g = g.astype(dt, copy=False)
    dq, dk, dv = np.empty(q.shape, dt), np.empty(k.shape, dt), np.empty(v.shape, dt)

    c = _batch_rows_per_step(P)
    product = _products(dt)

    def rows(a, b):
        dOT_buf = np.empty((c, Hkv, G, hs, Tq), dt)
        dS_buf = np.empty((c, Hkv, G, Tk, Tq), dt)
        per_head_buf = np.empty((c, Hkv, G, Tk, hs), dt)                      # dK, dV before summing G
        for i in range(a, b, c):
            j = min(i + c, b)
            n = j - i
            dOT, dS, per_head = dOT_buf[:n], dS_buf[:n], per_head_buf[:n]
            gi = g[i:j].reshape(n, Tq, Hkv, G, hs)
            np.multiply(gi.transpose(0, 2, 3, 4, 1), scale, out=dOT)           # dO'^T, row-major
            D = np.einsum("...d,...d->...", g[i:j], out[i:j])                  # rowsum(dO O), (n, Tq, H)
            D *= scale
            s = P[i:j]
            product(s, gi.transpose(0, 2, 3, 1, 4), out=per_head)              # P^T dO per query head
            np.sum(per_head, axis=2, out=dv[i:j].transpose(0, 2, 1, 3))
            product(v[i:j].transpose(0, 2, 1, 3)[:, :, None], dOT, out=dS)     # dO' V^T, transposed
            dS -= D.reshape(n, Tq, Hkv, G).transpose(0, 2, 3, 1)[..., None, :]
            dS *= s
            product(dS, q[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4), out=per_head)
            np.sum(per_head, axis=2, out=dk[i:j].transpose(0, 2, 1, 3))
            product(dS.swapaxes(-1, -2), k[i:j].transpose(0, 2, 1, 3)[:, :, None],
                    out=dq[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4))

    cpu.for_row_blocks(rows, B, P.size)
    return dq, dk, dv


def _products(dt):
    """The CPU attention's matrix products: np.matmul, or with bf16 products on (fp32 operands)
    oneDNN's bf16 multiply with fp32 accumulation, reading the same strided views in place. The
    softmax and its sums stay fp32 either way."""
    if dt == np.float32 and onednn.bf16_products():
        return lambda a, b, out: onednn.matmul(a, b, out)
    return np.matmul


def _batch_rows_per_step(E):
    """Batch rows per step: each step's NumPy calls cover ~1 MB of scores (fewer, larger calls;
    2 rows at the tiny shape, which timed faster than 1: BENCHMARKS.md), still inside the L2 cache."""
    return max(1, (2 * cpu.CHUNK_BYTES) // (E[0].nbytes or 1))
