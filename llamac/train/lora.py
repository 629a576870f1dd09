"""LoRA fine-tuning: low-rank adapters on a frozen base, applied to a pure Llama from outside.

`apply_lora(model, cfg)` freezes every parameter of the model, applies the training fusions
(train.fusions), gives each target projection an adapter (lora_a (r, in), kaiming-uniform as
PEFT draws it; lora_b (out, r), zeros, so the adapted model starts as the base) and swaps in
module classes whose forward adds the adapters' products (llamac.ops.lora):

- a target projection computes x W^T + (alpha / r) dropout(x) A^T B^T (LoRALinear);
- on the packed GPU path, q | k | v stay one GEMM against the stacked weight, each adapter's
  product added into its block, then RoPE and flash attention as without adapters;
- the MLP is one LoRASwiGLU, which recomputes gate and up in the backward (a frozen base needs
  no weight gradients, so nothing of size (tokens, hidden) is kept from forward to backward);
- with cfg.chat_tokens, the rows of the chat template's special tokens train too (PEFT's trainable
  tokens): pretraining never saw <|user|>, <|assistant|> or <|end|>, so their rows are alike (the
  LM head's gradient pushes every unseen row the same way) and a frozen base cannot tell them
  apart; token_rows (k, C) stand in for those rows of the embedding, and of an untied head.

Only the adapters (and token rows) carry gradients and optimizer state. A LoRA checkpoint holds
them, and its state.json the adapter settings with the base's path and the hash of its weights
(`weights_hash`); loading one checks the hash, then merges (`merge_adapters`).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from llamac import runtime
from llamac.config import LORA_TARGETS, LoRAConfig
from llamac.engine import backend
from llamac.engine.tensor import Tensor
from llamac.errors import LlamacError
from llamac.infer.chat import TEMPLATE_TOKENS
from llamac.model import layers as nn
from llamac.model.llama import Attention, Llama
from llamac.ops import attention
from llamac.ops.cross_entropy import CrossEntropy, head_loss
from llamac.ops.lora import embedding_with_rows, linear_with_rows, lora_linear, lora_swiglu, with_rows
from llamac.train import fusions

# Hugging Face name of each target -> (the block's module, the projection) in llamac's model
TARGET_MODULES = {"q_proj": ("attention", "wq"), "k_proj": ("attention", "wk"), "v_proj": ("attention", "wv"),
                  "o_proj": ("attention", "wo"), "gate_proj": ("feed_forward", "w1"),
                  "up_proj": ("feed_forward", "w3"), "down_proj": ("feed_forward", "w2")}
ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".token_rows")


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
    """PEFT's scaling: alpha / rank, or alpha / sqrt(rank) with rslora (cfg: a LoRAConfig or its dict)."""
    if isinstance(cfg, dict):
        rank, alpha, rslora = cfg["rank"], cfg["alpha"], cfg.get("rslora", False)
    else:
        rank, alpha, rslora = cfg.rank, cfg.alpha, cfg.rslora
    return float(alpha) / (math.sqrt(int(rank)) if rslora else int(rank))


def check_rank(model: Llama, cfg: LoRAConfig):
    """A rank above a target projection's smaller side adds nothing a full update would not: an error."""
    layer = model.layers[0]
    for target in cfg.targets:
        part, name = TARGET_MODULES[target]
        out_features, in_features = getattr(getattr(layer, part), name).weight.shape
        if cfg.rank > min(in_features, out_features):
            raise LlamacError(f"recipe key 'sft.lora.rank' {cfg.rank} is above the dimension of {target} "
                              f"({out_features} x {in_features}): choose at most {min(in_features, out_features)}")


class TokenRowsEmbedding(nn.Embedding):
    """The frozen embedding with the rows of a few tokens (token_ids) trained apart, in token_rows."""

    def forward(self, ids):
        return embedding_with_rows(ids, self.weight, self.token_rows, token_index(self, self.weight.xp))


class LoRALlama(fusions.FusedLlama):
    """A LoRA model whose chat tokens' rows train (PEFT's trainable tokens): the embedding reads them
    (TokenRowsEmbedding) and the head's logits for those ids come from them, the embedding's own when
    tied, the head's (output.token_rows) otherwise; the frozen weights are never written."""

    def forward(self, idx, targets=None, segment_ids=None, cache=None):
        x = self.hidden_states(idx, segment_ids, cache)
        return self.head(x, Llama.head_weight.fget(self), targets)

    @property
    def head_weight(self):
        """The head's weight with the rows in place, a copy: for readers of the weight itself
        (log-likelihood scoring); training and decoding go through `head`."""
        rows, index = self._head_rows()
        return Tensor(with_rows(Llama.head_weight.fget(self).data, rows.data, index))

    def _head_rows(self):
        module = self.tok_embeddings if self.output is None else self.output
        return module.token_rows, token_index(module, module.weight.xp)

    def head(self, x, weight, targets=None):
        rows, index = self._head_rows()
        if targets is not None and self._head_loss(x, weight):
            return None, head_loss(x, weight, targets, ignore_index=-100, rows=rows, index=index)
        logits = linear_with_rows(x, weight, rows, index)               # (B, T, V)
        if targets is None:
            return logits, None
        targets = targets if isinstance(targets, Tensor) else Tensor(targets)
        overwrite = logits.xp is not np and logits.requires_grad and runtime.options().overwrite_logits
        return logits, CrossEntropy.apply(logits, targets, ignore_index=-100, overwrite_logits=overwrite)


def token_index(module, xp):
    """The module's token_ids as an int64 array on xp's device, made once (a CUDA graph keeps its address)."""
    cache = module.__dict__.setdefault("_token_index", {})
    if xp.__name__ not in cache:
        cache[xp.__name__] = xp.asarray(np.asarray(module.token_ids, np.int64))
    return cache[xp.__name__]


def chat_token_ids(tokenizer) -> list:
    """The ids of the chat template's special tokens that the tokenizer has."""
    ids = [tokenizer.piece_to_id(t) for t in TEMPLATE_TOKENS]
    return sorted(i for i in set(ids) if i != tokenizer.unk_id)


def apply_lora(model: Llama, cfg: LoRAConfig, token_ids=(), seed: int = 0) -> Llama:
    """Freeze `model`, add cfg's adapters (in the model's dtype, on its device), in place; returns model.
    The A matrices are drawn from their own generator seeded by `seed`, so a run repeats exactly.
    With cfg.chat_tokens, the rows of `token_ids` (chat_token_ids) in the embedding, and in an untied
    head, train too: token_rows starts as a copy of those rows, as PEFT's trainable tokens do."""
    check_rank(model, cfg)
    for p in model.parameters():
        p.requires_grad = False
    fusions.fuse(model)
    scale = scale_of(cfg)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for target in LORA_TARGETS:             # a fixed order: the parameters' order does not follow the recipe's
            if target not in cfg.targets:
                continue
            part, name = TARGET_MODULES[target]
            module = getattr(getattr(layer, part), name)
            out_features, in_features = module.weight.shape
            bound = 1 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)), U(-1/sqrt(in), 1/sqrt(in))
            a = rng.uniform(-bound, bound, (cfg.rank, in_features)).astype(np.float32)
            module.lora_a = _parameter_like(module.weight, a)
            module.lora_b = _parameter_like(module.weight, np.zeros((out_features, cfg.rank), np.float32))
            module.scale, module.dropout = scale, cfg.dropout
            module.__class__ = LoRAProjection
        for block, cls in ((layer.attention, LoRAAttention), (layer.feed_forward, LoRAFeedForward)):
            block.__class__ = cls
            block.lora_scale, block.lora_dropout = scale, cfg.dropout
    ids = sorted({int(i) for i in token_ids}) if cfg.chat_tokens else []
    if ids:
        for module in (model.tok_embeddings, model.output):
            if module is not None:
                module.token_rows = nn.Parameter(module.weight.data[module.weight.xp.asarray(ids)].copy())
                module.token_ids = tuple(ids)
        model.tok_embeddings.__class__ = TokenRowsEmbedding
        model.__class__ = LoRALlama
    model.lora = cfg
    return model


def _parameter_like(weight, values: np.ndarray) -> nn.Parameter:
    return nn.Parameter(backend.to_device(values, weight.device).astype(weight.dtype))


# What a checkpoint from before a setting existed trained: plain alpha / rank, no token rows.
SETTINGS_BEFORE = {"rslora": False, "chat_tokens": False}


def lora_config_of(state: dict) -> LoRAConfig:
    """The LoRAConfig a checkpoint's state.json records under 'lora'."""
    return LoRAConfig(rank=state["rank"], alpha=state["alpha"], dropout=state["dropout"],
                      targets=list(state["targets"]), **{k: state.get(k, v) for k, v in SETTINGS_BEFORE.items()})


def token_ids_of(state: dict) -> list:
    """The token ids whose rows a LoRA checkpoint trained (state.json's 'lora' entry)."""
    return list(state.get("token_ids", []))


def describe(cfg: LoRAConfig, base: str, base_hash: str, token_ids=()) -> dict:
    """What a LoRA checkpoint records: the adapters' settings, the ids of the token rows it trains,
    the base's path and weights hash."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets),
            "rslora": cfg.rslora, "chat_tokens": cfg.chat_tokens,
            "token_ids": sorted({int(i) for i in token_ids}) if cfg.chat_tokens else [],
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
    """The base's weights with every adapter merged in, W + (alpha / r) B A (float64 sums, float32 out),
    and the trained token rows in place. `base` is not changed; `adapters` holds lora_a / lora_b under
    their projections' names and token_rows under the embedding's (and an untied head's)."""
    scale = scale_of(lora_state)
    merged = dict(base)
    ids = np.asarray(token_ids_of(lora_state), np.int64)
    for name in adapters:
        if name.endswith(".token_rows"):
            prefix = name[: -len(".token_rows")]
            merged[prefix + ".weight"] = with_rows(np.asarray(base[prefix + ".weight"], np.float32),
                                                 np.asarray(adapters[name], np.float32), ids)
        if not name.endswith(".lora_a"):
            continue
        prefix = name[: -len(".lora_a")]
        a = np.asarray(adapters[name], np.float64)
        b = np.asarray(adapters[prefix + ".lora_b"], np.float64)
        w = np.asarray(base[prefix + ".weight"], np.float64)
        merged[prefix + ".weight"] = (w + scale * (b @ a)).astype(np.float32)
    return merged
