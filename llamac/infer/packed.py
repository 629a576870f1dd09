"""The GPU decoder's weights: bf16, each layer's q | k | v rows stacked into one matrix and the gate and
up rows interleaved (SwiGLU in the GEMV's epilogue); random ones for benchmarks; the bytes a step reads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamac.engine import backend
from llamac.errors import LlamacError

BF16 = backend.bfloat16


@dataclass
class PackedLayer:
    attn_norm: object   # (C,)
    wq: object          # (H*hs, C)     the model's own matrices, for the prefill
    wk: object          # (Hkv*hs, C)
    wv: object
    wo: object          # (C, H*hs)
    ffn_norm: object
    w1: object          # (hidden, C)
    w2: object          # (C, hidden)
    w3: object
    wqkv: object        # (H*hs + 2*Hkv*hs, C)  q, k, v rows stacked: one GEMV
    w13: object         # (2*hidden, C)  rows interleaved gate_0, up_0, gate_1, ...: SwiGLU in the epilogue


def pack_weights(cfg, state: dict, xp) -> tuple[list[PackedLayer], dict]:
    """bf16 weights on xp's device from a llamac state dict (names as llamac.model)."""

    def get(name):
        if name not in state:
            raise LlamacError(f"fast decode: weight {name!r} missing from the model")
        a = state[name]
        a = backend.to_device(a, "cpu" if xp is np else "cuda")
        return a if a.dtype == BF16 else a.astype(BF16)

    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        wq, wk, wv = (get(p + f"attention.{n}.weight") for n in ("wq", "wk", "wv"))
        w1, w2, w3 = (get(p + f"feed_forward.{n}.weight") for n in ("w1", "w2", "w3"))
        layers.append(PackedLayer(
            attn_norm=get(p + "attention_norm.weight"), wq=wq, wk=wk, wv=wv, wo=get(p + "attention.wo.weight"),
            ffn_norm=get(p + "ffn_norm.weight"), w1=w1, w2=w2, w3=w3,
            wqkv=xp.ascontiguousarray(xp.concatenate([wq, wk, wv], axis=0)),
            w13=xp.ascontiguousarray(xp.stack([w1, w3], axis=1).reshape(2 * cfg.ffn_hidden, cfg.dim))))
    emb = get("tok_embeddings.weight")
    head = emb if cfg.tie_embeddings else get("output.weight")
    return layers, {"emb": emb, "head": head, "norm": get("norm.weight")}


def random_state(cfg, xp, seed: int = 0) -> dict:
    """A llamac state dict of N(0, 0.02) bf16 weights made on xp's device (benchmarks: no CPU init)."""
    rs = xp.random.RandomState(seed) if xp is not np else np.random.RandomState(seed)
    hs = cfg.head_size
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (cfg.n_heads * hs, cfg.dim), p + "attention.wk.weight": (cfg.kv_heads * hs, cfg.dim),
                       p + "attention.wv.weight": (cfg.kv_heads * hs, cfg.dim), p + "attention.wo.weight": (cfg.dim, cfg.n_heads * hs),
                       p + "feed_forward.w1.weight": (cfg.ffn_hidden, cfg.dim), p + "feed_forward.w2.weight": (cfg.dim, cfg.ffn_hidden),
                       p + "feed_forward.w3.weight": (cfg.ffn_hidden, cfg.dim),
                       p + "attention_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,)})
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = xp.ones(shape, BF16)
        else:
            out[name] = (rs.standard_normal(shape, dtype=np.float32) * 0.02).astype(BF16)
    return out


def weight_bytes(cfg) -> int:
    """Bytes of weights one decode step must read: every layer's projections and the LM head (bf16)."""
    hs = cfg.head_size
    per_layer = ((cfg.n_heads + 2 * cfg.kv_heads) * hs * cfg.dim + cfg.dim * cfg.n_heads * hs
                 + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim)
    return 2 * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim + cfg.dim)


def kv_cache_bytes(cfg, cached_tokens: float) -> float:
    """Bytes of K and V one decode step reads over `cached_tokens` cached positions (all rows together)."""
    return 2 * cfg.n_layers * cached_tokens * cfg.kv_heads * cfg.head_size * 2
