"""The Llama model: embeddings, N x [RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU], RMSNorm, LM head.

Parameter names follow Meta's reference implementation (tok_embeddings, layers.N.attention.wq, ...).
RoPE rotates Meta's interleaved pairs (2i, 2i+1); the Hugging Face export permutes wq/wk rows
to transformers' rotate-half layout.
"""
from __future__ import annotations

import math

import numpy as np

from llamac.config import LLAMA3_FREQ_FACTORS, ModelConfig
from llamac.engine import functional
from llamac.engine.tensor import Tensor
from llamac.errors import LlamacError
from llamac.model import layers as nn
from llamac.ops import attention, linear, rope, swiglu
from llamac.ops.cross_entropy import CrossEntropy


def rope_inv_freq(cfg: ModelConfig, head_dim: int, seq_len: int) -> np.ndarray:
    """Rotary frequencies (head_dim/2,) in float64, after the configured context scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "dynamic":  # NTK-aware: grow the base only once the sequence outgrows training
        original = int(scaling.get("original_max_position_embeddings", cfg.max_seq_len))
        if seq_len > original:
            base = cfg.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    elif kind == "llama3":  # Llama 3.1: keep high frequencies, divide low ones, blend between
        original = float(scaling.get("original_max_position_embeddings", 8192))
        low, high = (float(scaling.get(key, default)) for key, default in LLAMA3_FREQ_FACTORS.items())
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > original / low, inv_freq / factor,
                            np.where(wavelen < original / high, inv_freq, blended))
    return inv_freq


def rope_tables(cfg: ModelConfig, head_dim: int, start: int, length: int, xp=np, dtype=np.float32):
    """cos, sin of shape (length, head_dim/2) for positions start .. start+length-1."""
    inv_freq = rope_inv_freq(cfg, head_dim, start + length)
    angles = np.arange(start, start + length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return xp.asarray(np.cos(angles).astype(dtype)), xp.asarray(np.sin(angles).astype(dtype))


class KVCache:
    """Preallocated keys and values per layer, (B, max_len, Hkv, hs); `length` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, xp, dtype):
        shape = (batch, max_len, cfg.kv_heads, cfg.head_size)
        self.k = [xp.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        self.v = [xp.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k: Tensor, v: Tensor):
        T = k.shape[1]
        end = self.length + T
        self.k[layer][:, self.length:end] = k.data
        self.v[layer][:, self.length:end] = v.data
        return Tensor(self.k[layer][:, :end]), Tensor(self.v[layer][:, :end])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim)

    def project(self, x):
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, mask: dict, cache=None, layer=0):
        """mask: attention()'s mask arguments for this forward (ops.attention.mask_for)."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)                # (B, T, H, hs)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)             # (B, T, Hkv, hs)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k = rope.rope(q, cos, sin), rope.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                            # (B, L + T, Hkv, hs)
        y = attention.attention(q, k, v, **mask)                        # (B, T, H, hs)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden)   # gate
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden)   # up

    def forward(self, x):
        return self.w2(swiglu.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.attention_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask: dict, cache=None, layer=0):
        h = self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        x = x + functional.dropout(h, self.dropout, self.training)
        h = self.feed_forward(self.ffn_norm(x))
        return x + functional.dropout(h, self.dropout, self.training)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = [Block(cfg) for _ in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size)
        self._rope_cache = {}
        self.init_weights()

    def init_weights(self):
        """GPT-2 / llama2.c: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            nn.normal_(p, std)

    def _rope(self, start: int, length: int, xp, dtype):
        key = (start, length, xp.__name__, np.dtype(dtype).str)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            cos, sin = rope_tables(self.config, self.config.head_size, start, length, xp, dtype)
            self._rope_cache[key] = (Tensor(cos), Tensor(sin))
        return self._rope_cache[key]

    def forward(self, idx, targets=None, segment_ids=None, cache: KVCache | None = None):
        """idx (B, T) int -> (logits (B, T, V), loss or None). With a cache, positions continue from it."""
        x = self.hidden_states(idx, segment_ids, cache)
        return self.head(x, self.head_weight, targets)

    @property
    def head_weight(self):
        """The LM head's (V, C) weight: the embedding itself when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden_states(self, idx, segment_ids=None, cache: KVCache | None = None):
        """idx (B, T) int -> the final RMSNorm's output (B, T, C), which the LM head reads."""
        idx = idx if isinstance(idx, Tensor) else Tensor(idx)
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len and (self.config.rope_scaling or {}).get("type") != "dynamic":
            raise LlamacError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({self.config.max_seq_len})")
        x = self.tok_embeddings(idx)                                     # (B, T, C)
        cos, sin = self._rope(start, T, x.xp, np.float32 if x.dtype == np.float64 else x.dtype)
        if x.dtype == np.float64:
            cos, sin = cos.to(dtype="float64"), sin.to(dtype="float64")
        segments = segment_ids.data if isinstance(segment_ids, Tensor) else segment_ids
        mask = attention.mask_for(x, self.config.head_size, T, start + T, segments)
        x = self.run_layers(x, cos, sin, mask, cache)                   # (B, T, C), normed
        if cache is not None:
            cache.length += T
        return x

    def run_layers(self, x, cos, sin, mask: dict, cache=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def head(self, x, weight, targets=None):
        """-> (logits (B, T, V), mean cross-entropy over targets != -100, or None)."""
        logits = linear.linear(x, weight)                               # (B, T, V)
        if targets is None:
            return logits, None
        targets = targets if isinstance(targets, Tensor) else Tensor(targets)
        return logits, CrossEntropy.apply(logits, targets, ignore_index=-100)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, p.xp, p.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        n = super().num_params()
        return n - self.tok_embeddings.weight.size if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N for the matmuls plus attention."""
        cfg, T = self.config, seq_len or self.config.max_seq_len
        n = self.num_params(non_embedding=self.output is not None)
        if self.output is None:        # tied: the embedding is used as the head matmul
            n = self.num_params()
        return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * T
