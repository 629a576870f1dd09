"""The Llama model: embeddings, N x [RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU], RMSNorm, LM head.

Parameter names follow Meta's reference implementation (tok_embeddings, layers.N.attention.wq, ...).
RoPE rotates Meta's interleaved pairs (2i, 2i+1); the Hugging Face export permutes wq/wk rows
to transformers' rotate-half layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llamac.config import ModelConfig
from llamac.engine import backend, cublas, functional
from llamac.engine.tensor import Tensor, grad_enabled
from llamac.model import layers as nn
from llamac.ops import attention, linear, rmsnorm, rope, swiglu
from llamac.ops.cross_entropy import CrossEntropy, head_loss

# GPU switches (tests and benchmarks compare against the unfused paths): residual adds fused into
# the RMSNorm after them; the training loss's backward overwriting the logits with their gradient.
FUSE_RESIDUALS = True
OVERWRITE_LOGITS = True
# GPU training: LM head + cross-entropy in row chunks (llamac.head_loss); forward returns no logits.
FUSED_HEAD_LOSS = True


@dataclass(frozen=True)
class Dims:
    """The resolved sizes of a ModelConfig (defaults filled in)."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int


def resolve(cfg: ModelConfig) -> Dims:
    hidden = cfg.hidden_dim
    if hidden is None:  # Llama's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of
        hidden = int(2 * 4 * cfg.dim / 3)
        if cfg.ffn_dim_multiplier is not None:
            hidden = int(cfg.ffn_dim_multiplier * hidden)
        hidden = cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
    return Dims(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
                cfg.head_dim or cfg.dim // cfg.n_heads, hidden, cfg.vocab_size)


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
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
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

    def __init__(self, dims: Dims, batch: int, max_len: int, xp, dtype):
        shape = (batch, max_len, dims.n_kv_heads, dims.head_dim)
        self.k = [xp.zeros(shape, dtype) for _ in range(dims.n_layers)]
        self.v = [xp.zeros(shape, dtype) for _ in range(dims.n_layers)]
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k: Tensor, v: Tensor):
        T = k.shape[1]
        end = self.length + T
        self.k[layer][:, self.length:end] = k.data
        self.v[layer][:, self.length:end] = v.data
        return Tensor(self.k[layer][:, :end]), Tensor(self.v[layer][:, :end])


class Attention(nn.Module):
    def __init__(self, d: Dims):
        self.n_heads, self.n_kv_heads, self.head_dim = d.n_heads, d.n_kv_heads, d.head_dim
        self.wq = nn.Linear(d.dim, d.n_heads * d.head_dim)
        self.wk = nn.Linear(d.dim, d.n_kv_heads * d.head_dim)
        self.wv = nn.Linear(d.dim, d.n_kv_heads * d.head_dim)
        self.wo = nn.Linear(d.n_heads * d.head_dim, d.dim)

    def after_move(self):
        """On the GPU, wq | wk | wv become row blocks of one array, so the packed attention's
        stacked weight is that array itself: no per-step concatenation (three copy kernels a layer
        in every step, and in the CUDA graph). The optimizer updates the views in place."""
        weights = [m.weight for m in (self.wq, self.wk, self.wv)]
        xp = backend.get_array_module(weights[0].data)
        if xp is np or any(m.bias is not None for m in (self.wq, self.wk, self.wv)):
            return
        stacked = xp.concatenate([w.data for w in weights], axis=0)    # ((H + 2 Hkv) hs, C)
        start = 0
        for w in weights:
            w.data = stacked[start: start + w.shape[0]]
            start += w.shape[0]

    def forward(self, x, cos, sin, bias=None, cache=None, layer=0, causal=False, segments=None):
        """bias: the additive mask shared by every layer, or None with causal/segments for the flash path."""
        B, T, _ = x.shape
        projections = (self.wq, self.wk, self.wv)
        if (cache is None and bias is None and all(m.bias is None for m in projections)
                and attention.use_packed_attention(x, self.head_dim)):
            # The GPU flash path: one GEMM for q | k | v, RoPE's backward inside the attention kernel.
            y = attention.packed_attention(x, [m.weight for m in projections], cos, sin, self.n_heads,
                                       self.n_kv_heads, segments, causal)  # (B, T, H, hs)
            return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))
        q, k, v = _projections(x, projections)
        q = q.reshape(B, T, self.n_heads, self.head_dim)                # (B, T, H, hs)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)             # (B, T, Hkv, hs)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k = rope.rope(q, cos, sin), rope.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                            # (B, L + T, Hkv, hs)
        y = attention.attention(q, k, v, segments, causal=causal, bias=bias)  # (B, T, H, hs)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, d: Dims):
        self.w1 = nn.Linear(d.dim, d.hidden_dim)   # gate
        self.w2 = nn.Linear(d.hidden_dim, d.dim)   # down
        self.w3 = nn.Linear(d.dim, d.hidden_dim)   # up

    def forward(self, x):
        gate, up = _projections(x, (self.w1, self.w3))
        if self.w2.bias is None:
            return swiglu.swiglu_down(gate, up, self.w2.weight)
        return self.w2(swiglu.swiglu(gate, up))


def _projections(x, linears):
    """Bias-free projections of one input (the norm output only they read): linear.linears sums their
    input gradients inside the GEMMs on the GPU."""
    if any(m.bias is not None for m in linears):
        return [m(x) for m in linears]
    return linear.linears(x, [m.weight for m in linears])


class Block(nn.Module):
    def __init__(self, d: Dims, cfg: ModelConfig):
        self.attention_norm = nn.RMSNorm(d.dim, cfg.norm_eps)
        self.attention = Attention(d)
        self.ffn_norm = nn.RMSNorm(d.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(d)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, bias=None, cache=None, layer=0, causal=False, segments=None):
        h = self.attention(self.attention_norm(x), cos, sin, bias, cache, layer, causal, segments)
        x = x + functional.dropout(h, self.dropout, self.training)
        h = self.feed_forward(self.ffn_norm(x))
        return x + functional.dropout(h, self.dropout, self.training)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.config = cfg
        self.dims = d = resolve(cfg)
        self.tok_embeddings = nn.Embedding(d.vocab_size, d.dim)
        self.layers = [Block(d, cfg) for _ in range(d.n_layers)]
        self.norm = nn.RMSNorm(d.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(d.dim, d.vocab_size)
        self._rope_cache = {}
        # Training (train.recompute): each layer's activations recomputed in the backward instead
        # of kept; the residual adds are then not fused into the norms (a layer is x -> x).
        self.recompute = False
        self.init_weights()

    def init_weights(self):
        """GPT-2 / llama2.c: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 / math.sqrt(2 * self.dims.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            nn.normal_(p, std)

    def _rope(self, start: int, length: int, xp, dtype):
        key = (start, length, xp.__name__, np.dtype(dtype).str)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            cos, sin = rope_tables(self.config, self.dims.head_dim, start, length, xp, dtype)
            self._rope_cache[key] = (Tensor(cos), Tensor(sin))
        return self._rope_cache[key]

    def forward(self, idx, targets=None, segment_ids=None, cache: KVCache | None = None):
        """idx (B, T) int -> (logits (B, T, V), loss or None). With a cache, positions continue from it.
        GPU training (targets given, gradients on): logits is None, the loss having been computed
        from the head in row chunks (llamac.head_loss; FUSED_HEAD_LOSS = False keeps the logits)."""
        idx = idx if isinstance(idx, Tensor) else Tensor(idx)
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len and (self.config.rope_scaling or {}).get("type") != "dynamic":
            from llamac.errors import LlamacError
            raise LlamacError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({self.config.max_seq_len})")
        x = self.tok_embeddings(idx)                                     # (B, T, C)
        cos, sin = self._rope(start, T, x.xp, np.float32 if x.dtype == np.float64 else x.dtype)
        if x.dtype == np.float64:
            cos, sin = cos.to(dtype="float64"), sin.to(dtype="float64")
        segments = segment_ids.data if isinstance(segment_ids, Tensor) else segment_ids
        if attention.use_flash(x, self.dims.head_dim):
            # The flash kernel masks as it goes: no (T, start + T) bias is built at all.
            bias, mask = None, {"causal": True, "segments": segments}
        else:
            bias = attention.attention_bias(x.xp, T, start + T, segments, causal=True, dtype=x.dtype)
            bias = Tensor(bias) if bias is not None else None            # one mask for every layer
            mask = {}
        if self.recompute and self.training and grad_enabled() and cache is None:
            for i, layer in enumerate(self.layers):   # only each layer's input kept for the backward
                x = functional.recompute(lambda t, layer=layer, i=i: layer(t, cos, sin, bias, None, i, **mask),
                                         x, layer.parameters())
            x = self.norm(x)
        elif self._fuse_residuals(x):
            x = self._fused_layers(x, cos, sin, bias, cache, mask)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, bias, cache, i, **mask)
            x = self.norm(x)
        if cache is not None:
            cache.length += T
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        if targets is not None and self._head_loss(x, head):
            # Training on the GPU: the logits exist one row chunk at a time inside the loss
            # (llamac.head_loss), so there are none to return.
            return None, head_loss(x, head, targets, ignore_index=-100)
        logits = linear.linear(x, head)                                  # (B, T, V)
        loss = None
        if targets is not None:
            targets = targets if isinstance(targets, Tensor) else Tensor(targets)
            # On the GPU the loss's backward writes the logits' gradient over the logits (B*T*V
            # values: the largest activation of a step): read `logits` before calling backward.
            overwrite = logits.xp is not np and logits.requires_grad and OVERWRITE_LOGITS
            loss = CrossEntropy.apply(logits, targets, ignore_index=-100, overwrite_logits=overwrite)
        return logits, loss

    def _head_loss(self, x, head) -> bool:
        """GPU with gradients on: the LM head and the loss as one chunked HeadLoss."""
        return (FUSED_HEAD_LOSS and x.xp is not np and grad_enabled() and (x.requires_grad or head.requires_grad)
                and cublas.gemm_supported(x.dtype) and x.dtype == head.dtype)

    def _fuse_residuals(self, x) -> bool:
        """GPU without active dropout: each residual add runs in one kernel with the RMSNorm after it."""
        return FUSE_RESIDUALS and rmsnorm.use_fused_residual(x, self.norm.weight) and not any(
            layer.dropout and layer.training for layer in self.layers)

    def _fused_layers(self, x, cos, sin, bias, cache, mask):
        """The layers with every residual add fused into the next norm: x + attention -> ffn_norm,
        x + feed-forward -> the next layer's attention_norm (the final norm after the last)."""
        n = self.layers[0].attention_norm(x)
        for i, layer in enumerate(self.layers):
            h = layer.attention(n, cos, sin, bias, cache, i, **mask)
            x, n = rmsnorm.add_rms_norm(x, h, layer.ffn_norm.weight, layer.ffn_norm.eps)
            h = layer.feed_forward(n)
            following = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            x, n = rmsnorm.add_rms_norm(x, h, following.weight, following.eps)
        return n

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.dims, batch, max_len or self.config.max_seq_len, p.xp, p.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        n = super().num_params()
        return n - self.tok_embeddings.weight.size if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N for the matmuls plus attention."""
        d, T = self.dims, seq_len or self.config.max_seq_len
        n = self.num_params(non_embedding=self.output is not None)
        if self.output is None:        # tied: the embedding is used as the head matmul
            n = self.num_params()
        return 6 * n + 12 * d.n_layers * d.n_heads * d.head_dim * T
