"""LoRA fine-tuning: low-rank adapters on a frozen base, applied to a pure Llama from outside.

`apply_lora(model, cfg)` freezes every parameter of the model, applies the training fusions
(train.fusions), gives each target projection an adapter (lora_a (r, in), kaiming-uniform as
PEFT draws it; lora_b (out, r), zeros, so the adapted model starts as the base) and swaps in
module classes whose forward adds the adapters' products (llamac.ops.lora):

- a target projection computes x W^T + (alpha / r) dropout(x) A^T B^T (LoRALinear);
- on the packed GPU path, q | k | v stay one GEMM against the stacked weight, each adapter's
  product added into its block, then RoPE and flash attention as without adapters;
- the MLP is one LoRASwiGLU, which recomputes gate and up in the backward (a frozen base needs
  no weight gradients, so nothing of size (tokens, hidden) is kept from forward to backward).

Only the adapters carry gradients and optimizer state. A LoRA checkpoint holds the adapters, and
its state.json the adapter settings with the base's path and the hash of its weights
(`weights_hash`); loading one checks the hash, then merges (`merge_adapters`).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from llamac.config import LORA_TARGETS, LoRAConfig
from llamac.engine import backend
from llamac.engine.tensor import generator
from llamac.errors import LlamacError
from llamac.model import layers as nn
from llamac.model.llama import Attention, Llama
from llamac.ops import attention
from llamac.ops.lora import lora_linear, lora_swiglu
from llamac.train import fusions

# Hugging Face name of each target -> (the block's module, the projection) in llamac's model
TARGET_MODULES = {"q_proj": ("attention", "wq"), "k_proj": ("attention", "wk"), "v_proj": ("attention", "wv"),
                  "o_proj": ("attention", "wo"), "gate_proj": ("feed_forward", "w1"),
                  "up_proj": ("feed_forward", "w3"), "down_proj": ("feed_forward", "w2")}
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoRAProjection(nn.Linear):
    """A frozen projection with an adapter: forward x W^T + scale dropout(x) A^T B^T."""

    def forward(self, x):
        return lora_linear(x, self.weight, [self.adapter()], self.scale, self.dropout, self.training)

    def adapter(self, start: int = 0):
        return self.lora_a, self.lora_b, (start, start + self.weight.shape[0])


class LoRAAttention(fusions.FusedAttention):
    """Attention whose projections may have adapters (LoRAProjection): on the packed GPU path the
    adapted q | k | v are still one GEMM; elsewhere each projection runs its own forward."""

    def project(self, x):
        return Attention.project(self, x)

    def forward(self, x, cos, sin, mask: dict, cache=None, layer=0):
        projections = (self.wq, self.wk, self.wv)
        if not any(isinstance(m, LoRAProjection) for m in projections):
            return super().forward(x, cos, sin, mask, cache, layer)
        if cache is None and "bias" not in mask and attention.use_packed_attention(x, self.head_dim):
            B, T, _ = x.shape
            adapters, start = [], 0
            for m in projections:
                if isinstance(m, LoRAProjection):
                    adapters.append(m.adapter(start))
                start += m.weight.shape[0]
            stacked = attention.stacked_weight([m.weight for m in projections])
            qkv = lora_linear(x, stacked, adapters, self.lora_scale, self.lora_dropout, self.training)
            y = attention.packed_qkv_attention(qkv, cos, sin, self.n_heads, self.n_kv_heads, mask.get("segments"),
                                               mask.get("causal", True))
            return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))
        return Attention.forward(self, x, cos, sin, mask, cache, layer)


class LoRAFeedForward(fusions.FusedFeedForward):
    """The MLP as one LoRASwiGLU: adapters on any of gate, up and down; gate and up recomputed
    in the backward."""

    def forward(self, x):
        adapters = tuple((m.lora_a, m.lora_b) if isinstance(m, LoRAProjection) else None
                         for m in (self.w1, self.w3, self.w2))
        return lora_swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, adapters, self.lora_scale,
                           self.lora_dropout, self.training)


def scale_of(cfg) -> float:
    """PEFT's scaling: alpha / rank (cfg: a LoRAConfig or its dict)."""
    rank, alpha = (cfg["rank"], cfg["alpha"]) if isinstance(cfg, dict) else (cfg.rank, cfg.alpha)
    return float(alpha) / int(rank)


def check_rank(model: Llama, cfg: LoRAConfig):
    """A rank above a target projection's smaller side adds nothing a full update would not: an error."""
    layer = model.layers[0]
    for target in cfg.targets:
        part, name = TARGET_MODULES[target]
        out_features, in_features = getattr(getattr(layer, part), name).weight.shape
        if cfg.rank > min(in_features, out_features):
            raise LlamacError(f"recipe key 'sft.lora.rank' {cfg.rank} is above the dimension of {target} "
                              f"({out_features} x {in_features}): choose at most {min(in_features, out_features)}")


def apply_lora(model: Llama, cfg: LoRAConfig) -> Llama:
    """Freeze `model`, add cfg's adapters (in the model's dtype, on its device), in place; returns model."""
    check_rank(model, cfg)
    for p in model.parameters():
        p.requires_grad = False
    fusions.fuse(model)
    scale = scale_of(cfg)
    for layer in model.layers:
        for target in LORA_TARGETS:             # a fixed order: the parameters' order does not follow the recipe's
            if target not in cfg.targets:
                continue
            part, name = TARGET_MODULES[target]
            module = getattr(getattr(layer, part), name)
            out_features, in_features = module.weight.shape
            bound = 1 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)), U(-1/sqrt(in), 1/sqrt(in))
            a = generator("cpu").uniform(-bound, bound, (cfg.rank, in_features)).astype(np.float32)
            module.lora_a = _parameter_like(module.weight, a)
            module.lora_b = _parameter_like(module.weight, np.zeros((out_features, cfg.rank), np.float32))
            module.scale, module.dropout = scale, cfg.dropout
            module.__class__ = LoRAProjection
        for block, cls in ((layer.attention, LoRAAttention), (layer.feed_forward, LoRAFeedForward)):
            block.__class__ = cls
            block.lora_scale, block.lora_dropout = scale, cfg.dropout
    model.lora = cfg
    return model


def _parameter_like(weight, values: np.ndarray) -> nn.Parameter:
    return nn.Parameter(backend.to_device(values, weight.device).astype(weight.dtype))


def lora_config_of(state: dict) -> LoRAConfig:
    """The LoRAConfig a checkpoint's state.json records under 'lora'."""
    return LoRAConfig(rank=state["rank"], alpha=state["alpha"], dropout=state["dropout"], targets=list(state["targets"]))


def describe(cfg: LoRAConfig, base: str, base_hash: str) -> dict:
    """What a LoRA checkpoint records: the adapters' settings, the base's path and weights hash."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets),
            "base": base, "base_hash": base_hash}


def weights_hash(state: dict) -> str:
    """sha256 over a model's weights as float32 in llamac's layout (names, shapes, values), whatever
    file or device they came from: the same base gives the same hash."""
    digest = hashlib.sha256()
    for name in sorted(state):
        w = np.ascontiguousarray(backend.to_numpy(state[name]), dtype=np.float32)
        digest.update(f"{name}:{w.shape};".encode())
        digest.update(w.data)
    return "sha256:" + digest.hexdigest()


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def merge_adapters(base: dict, adapters: dict, lora_state: dict) -> dict:
    """The base's weights with every adapter merged in, W + (alpha / r) B A (float64 sums, float32 out).
    `base` is not changed; `adapters` holds lora_a / lora_b under their projections' names."""
    scale = scale_of(lora_state)
    merged = dict(base)
    for name in adapters:
        if not name.endswith(".lora_a"):
            continue
        prefix = name[: -len(".lora_a")]
        a = np.asarray(adapters[name], np.float64)
        b = np.asarray(adapters[prefix + ".lora_b"], np.float64)
        w = np.asarray(base[prefix + ".weight"], np.float64)
        merged[prefix + ".weight"] = (w + scale * (b @ a)).astype(np.float32)
    return merged
