"""The CPU's fused paths (NumPy): what kernels/*.cu are to the GPU, written for two cores and their L2
caches. Each works on rows split over the cores (llamac.cpu.for_row_blocks), a cache-sized chunk at a
time, and is called from its Function in llamac.fused, whose plain xp code is the reference they are
tested against."""
from __future__ import annotations

import numpy as np

from llamac import cpu
from llamac.ops import compute_dtype


# ---------------------------------------------------------------- RMSNorm

def rms_norm_forward(x, weight, eps):
    """Rows split over the cores, in L2-sized chunks: sum of squares as one einsum pass, then two
    passes for the output. Saves x and 1/rms (xhat is recomputed chunk by chunk in the backward)."""
    ct = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(ct, copy=False)
    n, C = x2.shape
    rstd = np.empty(n, ct)
    out = np.empty(x2.shape, ct)
    w = weight.astype(ct, copy=False)

    def rows(a, b):
        r = rstd[a:b]
        np.einsum("ij,ij->i", x2[a:b], x2[a:b], out=r)
        r *= 1 / C
        r += eps
        np.sqrt(r, out=r)
        np.reciprocal(r, out=r)
        np.multiply(x2[a:b], r[:, None], out=out[a:b])
        out[a:b] *= w

    cpu.for_row_blocks(rows, n, x2.size, C * ct.itemsize)
    return out.reshape(x.shape).astype(x.dtype, copy=False), (x2, rstd, weight, x.shape)


def rms_norm_backward(g, x2, rstd, weight, shape):
    """gx = (g w - xhat mean(g w xhat)) / rms; gw = sum over rows of g xhat (one partial sum per
    thread, added in a fixed order: deterministic)."""
    ct = x2.dtype
    n, C = x2.shape
    g2 = g.reshape(n, C).astype(ct, copy=False)
    w = weight.astype(ct, copy=False)
    gx = np.empty((n, C), ct)
    partial_gw = {}

    def rows(a, b):
        xh = np.multiply(x2[a:b], rstd[a:b, None])
        t = np.multiply(g2[a:b], xh)
        partial = t.sum(axis=0)
        key = cpu.block_id()
        partial_gw[key] = partial_gw[key] + partial if key in partial_gw else partial
        gxh = np.multiply(g2[a:b], w, out=t)
        dot = np.einsum("ij,ij->i", gxh, xh)
        dot *= 1 / C
        xh *= dot[:, None]
        gxh -= xh
        np.multiply(gxh, rstd[a:b, None], out=gx[a:b])

    cpu.for_row_blocks(rows, n, x2.size, C * ct.itemsize)
    gw = sum(partial_gw[k] for k in sorted(partial_gw))
    return gx.reshape(shape), gw.astype(weight.dtype, copy=False)


# ---------------------------------------------------------------- RoPE

def rotate_pairs(x, cos, sin, sign):
    """Each pair (x_2i, x_2i+1) as one complex number times e^(i sign angle): a single complex
    multiply per pair (Meta's reference does the same with view_as_complex), batch rows split
    over the cores."""
    B, T, H, hs = x.shape
    ctype = np.complex64 if x.dtype == np.float32 else np.complex128
    xc = np.ascontiguousarray(x).view(ctype)                            # (B, T, H, hs/2)
    rot = np.empty(cos.shape, ctype)                                    # (T, hs/2)
    rot.real, rot.imag = cos, sin if sign > 0 else -sin
    rot = rot[:, None, :]                                               # (T, 1, hs/2)
    out = np.empty(xc.shape, ctype)
    cpu.for_row_blocks(lambda a, b: np.multiply(xc[a:b], rot, out=out[a:b]), B, x.size)
    return out.view(x.dtype)


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

    def rows(a, b):
        qsT = np.empty((c, Hkv, G, hs, Tq), dt)
        for i in range(a, b, c):
            j = min(i + c, b)
            n = j - i
            np.multiply(q[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 4, 1), scale, out=qsT[:n])
            s = P[i:j]
            np.matmul(k[i:j].transpose(0, 2, 1, 3)[:, :, None], qsT[:n], out=s)     # (n, Hkv, G, Tk, Tq)
            if biasT is not None:
                s += biasT[i:j, None, None] if len(biasT) > 1 else biasT[0]
            s -= s.max(axis=3, keepdims=True)
            np.exp(s, out=s)
            r = np.matmul(ones, s)                                             # column sums, (n, Hkv, G, Tq)
            np.reciprocal(r, out=r)
            s *= r[..., None, :]                                               # P, normalised per query
            np.matmul(s.swapaxes(-1, -2), v[i:j].transpose(0, 2, 1, 3)[:, :, None],
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
            np.matmul(s, gi.transpose(0, 2, 3, 1, 4), out=per_head)            # P^T dO per query head
            np.sum(per_head, axis=2, out=dv[i:j].transpose(0, 2, 1, 3))
            np.matmul(v[i:j].transpose(0, 2, 1, 3)[:, :, None], dOT, out=dS)   # dO' V^T, transposed
            dS -= D.reshape(n, Tq, Hkv, G).transpose(0, 2, 3, 1)[..., None, :]
            dS *= s
            np.matmul(dS, q[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4), out=per_head)
            np.sum(per_head, axis=2, out=dk[i:j].transpose(0, 2, 1, 3))
            np.matmul(dS.swapaxes(-1, -2), k[i:j].transpose(0, 2, 1, 3)[:, :, None],
                      out=dq[i:j].reshape(n, Tq, Hkv, G, hs).transpose(0, 2, 3, 1, 4))

    cpu.for_row_blocks(rows, B, P.size)
    return dq, dk, dv


def _batch_rows_per_step(E):
    """Batch rows per step: each step's NumPy calls cover ~1 MB of scores (fewer, larger calls;
    2 rows at the tiny shape, ~0.5 ms a step faster than 1), still inside the L2 cache."""
    return max(1, (2 * cpu.CHUNK_BYTES) // (E[0].nbytes or 1))
