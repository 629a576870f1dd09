"""Low-rank adapters (LoRA): y = x W^T + scale * dropout(x) A^T B^T, with W usually frozen.

LoRALinear is one projection whose rows may be split into blocks, each with its own adapter (A
(r, in), B (rows, r)): the packed q | k | v projection is one GEMM against the stacked weight,
and the adapters' products land in their blocks. The adapter's first product u = dropout(x) A^T
is (N, r): the backward needs it and x (for A's gradient), nothing of size (N, out).

LoRASwiGLU is the Llama MLP, w2(silu(w1 x) * w3 x), with an adapter on any of its projections.
It keeps x and the adapters' small products, not the (N, hidden) gate and up: with frozen base
weights their gradients cost no GEMM, so the backward recomputes gate and up (two GEMMs) instead
of holding 2 * hidden values per token from forward to backward, and writes SwiGLU's gradients
over the recomputed arrays.

Dropout masks are drawn from a seed taken from llamac's generator and drawn again in the
backward, so no mask is kept either. Everything is xp code: the same Functions run on NumPy and
CuPy arrays (GEMMs through engine.matmul: cuBLAS or OpenBLAS; SwiGLU through its own kernels).
"""
from __future__ import annotations

import numpy as np

from llamac.engine import backend
from llamac.engine.matmul import matmul
from llamac.engine.tensor import Function, Tensor, generator
from llamac.errors import ShapeError
from llamac.ops.swiglu import swiglu_backward_recompute_inplace, swiglu_forward


def _dropout_scale(xp, shape, dtype, p: float, seed):
    """The inverted-dropout factor (0 or 1 / (1 - p)) for one adapter input, drawn from `seed`."""
    keep = xp.random.default_rng(seed).random(shape, dtype=np.float32) >= p
    return (keep / (1 - p)).astype(dtype)


class _Adapters:
    """The adapters of one input: A stacked (k r, in), B as one block-diagonal (out, k r) array
    (each B on its own rows, zero elsewhere: one GEMM adds every product into the output)."""

    def __init__(self, xp, arrays, rows, out_features: int, scale: float):
        a_list, b_list = arrays[0::2], arrays[1::2]
        self.rows, self.scale = rows, scale
        self.ranks = [a.shape[0] for a in a_list]
        self.a = xp.concatenate(a_list, axis=0) if len(a_list) > 1 else a_list[0]
        if len(b_list) == 1 and rows[0] == (0, out_features):
            self.b = b_list[0]
        else:
            self.b = xp.zeros((out_features, sum(self.ranks)), b_list[0].dtype)
            col = 0
            for b, (start, stop), r in zip(b_list, rows, self.ranks):
                self.b[start:stop, col:col + r] = b
                col += r

    def down(self, xd2):
        """scale * dropout(x) A^T, (N, k r)."""
        u = matmul(xd2, self.a.T)
        u *= u.dtype.type(self.scale)
        return u

    def add_up(self, us, out2):
        """out2 += us B^T (inside the GEMM)."""
        matmul(us, self.b.T, out=out2, beta=1.0)

    def grads(self, g2, us, xd2):
        """(the gradient of dropout(x) A^T (N, k r), [A's, B's gradient] per adapter in input order);
        g2 is the output's gradient (N, out), us what `down` returned, xd2 the adapters' input."""
        gus = matmul(g2, self.b)                                        # (N, k r)
        gb_full = matmul(g2.T, us)                                      # (out, k r)
        gu = gus * gus.dtype.type(self.scale)
        ga_full = matmul(gu.T, xd2)                                     # (k r, in)
        if len(self.ranks) == 1 and self.b.shape[0] == self.rows[0][1] - self.rows[0][0]:
            return gu, [ga_full, gb_full]
        out, col = [], 0
        xp = backend.get_array_module(g2)
        for (start, stop), r in zip(self.rows, self.ranks):
            # contiguous: the fused AdamW (and its CUDA graph) take a gradient as one flat run
            out += [ga_full[col:col + r], xp.ascontiguousarray(gb_full[start:stop, col:col + r])]
            col += r
        return gu, out


def _check_adapters(op: str, w, arrays, rows):
    if len(arrays) != 2 * len(rows):
        raise ShapeError(f"{op}: {len(arrays)} adapter arrays for {len(rows)} row blocks (an A and a B each)")
    for (a, b), (start, stop) in zip(zip(arrays[0::2], arrays[1::2]), rows):
        if a.shape[1] != w.shape[1] or b.shape != (stop - start, a.shape[0]) or not 0 <= start < stop <= w.shape[0]:
            raise ShapeError(f"{op}: adapter A {a.shape}, B {b.shape} do not fit rows {start}:{stop} "
                             f"of weight {w.shape}")


class LoRALinear(Function):
    """x W^T + scale * dropout(x) A_i^T B_i^T on each row block i of W.

    forward(x, w, a_1, b_1, ..., a_k, b_k, rows=((start, stop), ...), scale, p, seed): x (..., in),
    w (out, in), a_i (r, in), b_i (stop - start, r). W may be trainable too (its gradient is
    g^T x)."""

    def forward(self, x, w, *arrays, rows, scale, p=0.0, seed=None):
        if x.shape[-1] != w.shape[1]:
            raise ShapeError(f"lora_linear: input {x.shape} does not fit weight {w.shape}")
        _check_adapters("lora_linear", w, arrays, rows)
        xp = backend.get_array_module(x)
        lead, C, O = x.shape[:-1], x.shape[-1], w.shape[0]
        x2 = x.reshape(-1, C)
        out = matmul(x2, w.T)                                           # (N, out)
        adapters = _Adapters(xp, arrays, rows, O, scale)
        xd2 = x2 * _dropout_scale(xp, x2.shape, x2.dtype, p, seed) if p else x2
        us = adapters.down(xd2)
        adapters.add_up(us, out)
        self.save(x2, w, us)
        self.adapters, self.p, self.seed, self.lead = adapters, p, seed, lead
        return out.reshape(*lead, O)

    def backward(self, g):
        x2, w, us = self.saved
        xp = backend.get_array_module(x2)
        adapters, p = self.adapters, self.p
        g2 = g.reshape(-1, g.shape[-1])
        mask = _dropout_scale(xp, x2.shape, x2.dtype, p, self.seed) if p else None
        xd2 = x2 * mask if p else x2
        gu, adapter_grads = adapters.grads(g2, us, xd2)
        gx = None
        if self.needs_grad[0]:
            lora_gx = matmul(gu, adapters.a)                            # (N, in)
            if mask is not None:
                lora_gx *= mask
            gx = matmul(g2, w, out=lora_gx, beta=1.0).reshape(*self.lead, x2.shape[1])
        gw = matmul(g2.T, x2) if self.needs_grad[1] else None
        return (gx, gw, *adapter_grads)


def lora_linear(x: Tensor, weight: Tensor, adapters, scale: float, dropout: float = 0.0,
                training: bool = True) -> Tensor:
    """x W^T plus the adapters' products: adapters is [(A, B, (start, stop)), ...], each on rows
    start:stop of the output (one adapter over all of W: rows (0, out))."""
    p = float(dropout) if training else 0.0
    seed = int(generator("cpu").integers(2**63)) if p else None
    tensors = [t for a, b, _ in adapters for t in (a, b)]
    return LoRALinear.apply(x, weight, *tensors, rows=tuple(r for _, _, r in adapters), scale=scale, p=p, seed=seed)


class LoRASwiGLU(Function):
    """w2(silu(w1 x) * w3 x) with an adapter on any of w1 (gate), w3 (up), w2 (down).

    forward(x, w1, w3, w2, *adapter arrays, present=(gate, up, down), scale, p, seeds): the
    adapter arrays are A, B of each present projection in that order. Keeps x, the (N, r)
    products and one (N, r) product of the down adapter; gate, up and silu(gate) * up are
    recomputed in the backward."""

    def forward(self, x, w1, w3, w2, *arrays, present, scale, p=0.0, seeds=(None, None, None)):
        xp = backend.get_array_module(x)
        if not (w1.shape == w3.shape and w1.shape[1] == x.shape[-1] and w2.shape == w1.shape[::-1]):
            raise ShapeError(f"lora_swiglu: input {x.shape}, w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do not fit")
        lead, C = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, C)
        adapters, pairs = [], iter(zip(arrays[0::2], arrays[1::2]))
        for on, w in zip(present, (w1, w3, w2)):
            if on:
                a, b = next(pairs)
                _check_adapters("lora_swiglu", w, (a, b), ((0, w.shape[0]),))
                adapters.append(_Adapters(xp, (a, b), ((0, w.shape[0]),), w.shape[0], scale))
            else:
                adapters.append(None)
        self.adapters, self.p, self.seeds, self.lead = adapters, p, seeds, lead
        gate, up, us_gate, us_up = self._gate_up(x2, w1, w3, None)
        h = swiglu_forward(gate, up)
        del gate, up
        out = matmul(h, w2.T)                                           # (N, C)
        us_down = None
        if adapters[2] is not None:
            us_down = adapters[2].down(self._dropped(h, 2))
            adapters[2].add_up(us_down, out)
        self.save(x2, w1, w3, w2, us_gate, us_up, us_down)
        return out.reshape(*lead, C)

    def _dropped(self, a, i):
        if not self.p:
            return a
        return a * _dropout_scale(backend.get_array_module(a), a.shape, a.dtype, self.p, self.seeds[i])

    def _gate_up(self, x2, w1, w3, saved):
        """gate and up with their adapters' products; `saved`: the (N, r) products of the forward."""
        outs = []
        for i, w in enumerate((w1, w3)):
            y = matmul(x2, w.T)
            us = None
            ad = self.adapters[i]
            if ad is not None:
                us = ad.down(self._dropped(x2, i)) if saved is None else saved[i]
                ad.add_up(us, y)
            outs.append((y, us))
        (gate, us_gate), (up, us_up) = outs
        return gate, up, us_gate, us_up

    def backward(self, g):
        x2, w1, w3, w2, us_gate, us_up, us_down = self.saved
        g2 = g.reshape(-1, g.shape[-1])
        gate, up, _, _ = self._gate_up(x2, w1, w3, (us_gate, us_up))
        grads = {}
        down = self.adapters[2]
        dh = matmul(g2, w2)                                             # (N, hidden)
        if down is not None:
            gu_down = matmul(g2, down.b)
            gu_down *= gu_down.dtype.type(down.scale)
            if self.p:
                dh += self._dropped(matmul(gu_down, down.a), 2)
            else:
                matmul(gu_down, down.a, out=dh, beta=1.0)               # added inside the GEMM
        # gate, up and dh are this backward's own: dgate, dup and h are written over them, so the
        # pass needs three (N, hidden) arrays, not six (the largest arrays of the LoRA step)
        dgate, dup, h = swiglu_backward_recompute_inplace(gate, up, dh)
        del gate, up, dh
        if down is not None:
            _, grads[2] = down.grads(g2, us_down, self._dropped(h, 2))
        gw2 = matmul(g2.T, h) if self.needs_grad[3] else None
        del h
        gx = matmul(dgate, w1) if self.needs_grad[0] else None
        if gx is not None:
            matmul(dup, w3, out=gx, beta=1.0)
        for i, (d, us) in enumerate(((dgate, us_gate), (dup, us_up))):
            ad = self.adapters[i]
            if ad is None:
                continue
            gu, grads[i] = ad.grads(d, us, self._dropped(x2, i))
            if gx is not None:
                if self.p:
                    gx += self._dropped(matmul(gu, ad.a), i)
                else:
                    matmul(gu, ad.a, out=gx, beta=1.0)
        gw1 = matmul(dgate.T, x2) if self.needs_grad[1] else None
        gw3 = matmul(dup.T, x2) if self.needs_grad[2] else None
        adapter_grads = [t for i in range(3) if i in grads for t in grads[i]]
        if gx is not None:
            gx = gx.reshape(*self.lead, x2.shape[1])
        return (gx, gw1, gw3, gw2, *adapter_grads)


def lora_swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, adapters, scale: float, dropout: float = 0.0,
                training: bool = True) -> Tensor:
    """The MLP with adapters: adapters is (gate, up, down), each (A, B) or None."""
    p = float(dropout) if training else 0.0
    seeds = tuple(int(generator("cpu").integers(2**63)) if p and ad is not None else None for ad in adapters)
    tensors = [t for ad in adapters if ad is not None for t in ad]
    return LoRASwiGLU.apply(x, w1, w3, w2, *tensors, present=tuple(ad is not None for ad in adapters),
                            scale=scale, p=p, seeds=seeds)


# ---------------------------------------------------------------- trainable token rows
# A few rows of the frozen embedding (and LM head) trained apart, as PEFT's trainable tokens: rows
# (k, C) stand in for rows `index` (k token ids) of W (V, C). Only the (k, C) rows get a gradient;
# nothing of size (V, C) is made.

class EmbeddingWithRows(Function):
    """W[ids] with rows[j] in place of W[index[j]]: forward(ids, w, rows, index=(k,) ids)."""

    def forward(self, ids, w, rows, index):
        xp = backend.get_array_module(w)
        if rows.shape != (len(index), w.shape[1]):
            raise ShapeError(f"embedding_with_rows: rows {rows.shape} do not fit {len(index)} ids of weight {w.shape}")
        hit = ids[..., None] == index                                   # (..., k)
        out = xp.where(hit.any(-1)[..., None], rows[hit.argmax(-1)], w[ids])   # (..., C)
        self.save(ids, hit)
        self.num_embeddings = w.shape[0]
        return out

    def backward(self, g):
        ids, hit = self.saved
        C = g.shape[-1]
        g2, hit2 = g.reshape(-1, C), hit.reshape(-1, hit.shape[-1])
        grows = matmul(hit2.T.astype(g.dtype), g2)                     # (k, C): each row's positions summed
        gw = None
        if self.needs_grad[1]:                                          # the replaced rows take none
            from llamac.ops.embedding import embedding_backward
            gw = embedding_backward(ids, g2 * ~hit2.any(-1, keepdims=True), self.num_embeddings)
        return None, gw, grows


class LinearWithRows(Function):
    """x W^T with column index[j] of the product from rows[j]: the LM head with trainable token rows.
    forward(x, w, rows, index): x (..., C), w (V, C), rows (k, C) -> (..., V)."""

    def forward(self, x, w, rows, index):
        if rows.shape != (len(index), w.shape[1]) or x.shape[-1] != w.shape[1]:
            raise ShapeError(f"linear_with_rows: input {x.shape}, weight {w.shape}, rows {rows.shape} do not fit")
        x2 = x.reshape(-1, x.shape[-1])
        out = matmul(x2, w.T)                                           # (N, V)
        out[:, index] = matmul(x2, rows.T)
        self.save(x2, w, rows, index)
        self.lead = x.shape[:-1]
        return out.reshape(*self.lead, w.shape[0])

    def backward(self, g):
        x2, w, rows, index = self.saved
        g2 = g.reshape(-1, g.shape[-1])
        g_rows = g2[:, index]                                           # (N, k)
        gx = gw = None
        if self.needs_grad[0]:      # through W, then the rows' columns moved from W's rows to `rows`
            gx = matmul(g2, w)
            matmul(g_rows, rows - w[index], out=gx, beta=1.0)
            gx = gx.reshape(*self.lead, x2.shape[1])
        if self.needs_grad[1]:
            g_w = g2.copy()
            g_w[:, index] = 0
            gw = matmul(g_w.T, x2)
        return gx, gw, matmul(g_rows.T, x2)


def embedding_with_rows(ids, weight: Tensor, rows: Tensor, index) -> Tensor:
    return EmbeddingWithRows.apply(ids if isinstance(ids, Tensor) else Tensor(ids), weight, rows, index=index)


def linear_with_rows(x: Tensor, weight: Tensor, rows: Tensor, index) -> Tensor:
    return LinearWithRows.apply(x, weight, rows, index=index)


def with_rows(weight, rows, index):
    """A copy of the array `weight` with rows[j] at row index[j] (the merged weight, for readers of W)."""
    out = weight.copy()
    out[index] = rows
    return out
