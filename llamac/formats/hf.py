"""Hugging Face Llama layout: config.json fields and weight names, both ways.

llamac (like Meta's reference code) rotates interleaved pairs (2i, 2i+1) in RoPE;
transformers rotates halves (i, i + hs/2). The same model in both layouts differs only
by a permutation of the rows of wq and wk within each head, done here.
"""
from __future__ import annotations

import numpy as np

from llamac.config import ModelConfig
from llamac.errors import LlamacError

LAYER_NAMES = {  # llamac name -> transformers name, inside layers.N
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def interleaved_to_halves(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Rows of a q/k projection from pair layout (2i, 2i+1) to half layout (i, i + hs/2)."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def halves_to_interleaved(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, w in state.items():
        w = np.asarray(w)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest == "attention.wq.weight":
                w = interleaved_to_halves(w, cfg.n_heads, cfg.head_size)
            elif rest == "attention.wk.weight":
                w = interleaved_to_halves(w, cfg.kv_heads, cfg.head_size)
            out[f"model.layers.{i}.{LAYER_NAMES[rest]}"] = np.ascontiguousarray(w)
        else:
            out[TOP_NAMES[name]] = np.ascontiguousarray(w)
    return out


def from_hf_state(hf: dict, cfg: ModelConfig, tie_embeddings: bool) -> dict:
    inverse_layer = {v: k for k, v in LAYER_NAMES.items()}
    inverse_top = {v: k for k, v in TOP_NAMES.items()}
    out = {}
    for name, w in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest not in inverse_layer:
                raise LlamacError(f"unsupported tensor in Hugging Face checkpoint: {name}")
            ours = inverse_layer[rest]
            if ours == "attention.wq.weight":
                w = halves_to_interleaved(w, cfg.n_heads, cfg.head_size)
            elif ours == "attention.wk.weight":
                w = halves_to_interleaved(w, cfg.kv_heads, cfg.head_size)
            out[f"layers.{i}.{ours}"] = np.ascontiguousarray(w)
        elif name in inverse_top:
            out[inverse_top[name]] = w
        else:
            raise LlamacError(f"unsupported tensor in Hugging Face checkpoint: {name}")
    if tie_embeddings:
        out.pop("output.weight", None)
    return out


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int | list = 2, pad_id: int | None = None,
              torch_dtype: str = "float32") -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _hf_rope_scaling(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if pad_id is not None and pad_id >= 0:
        config["pad_token_id"] = pad_id
    return config


def _hf_rope_scaling(cfg: ModelConfig):
    if not cfg.rope_scaling:
        return None
    scaling = dict(cfg.rope_scaling)
    kind = scaling.pop("type", scaling.pop("rope_type", None))
    return {"rope_type": kind, **{k: v for k, v in scaling.items()}}


def model_config_from_hf(config: dict) -> ModelConfig:
    if config.get("model_type") not in ("llama", None):
        raise LlamacError(f"unsupported Hugging Face model_type {config.get('model_type')!r} (llamac reads Llama)")
    scaling = config.get("rope_scaling") or None
    params = config.get("rope_parameters") or {}
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling:
        scaling = dict(scaling)
        scaling["type"] = scaling.pop("rope_type", scaling.pop("type", None))
        scaling.pop("rope_theta", None)
    n_heads = config["num_attention_heads"]
    return ModelConfig(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        hidden_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(config.get("rope_theta", params.get("rope_theta", 10000.0))),
        rope_scaling=scaling, norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)))
