"""A LoRA run's adapters as a Hugging Face PEFT adapter folder, for the Hugging Face export of its base:

    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (r, in)
                                and ...lora_B.weight (out, r) for every adapted projection

A run that trained its chat tokens' rows (sft.lora.chat_tokens) adds them as PEFT's trainable tokens:
base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta (k, C) (the rows themselves,
in trainable_token_indices' order), and for an untied head base_model.model.lm_head.token_adapter...

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf), folder)` computes
x W^T + (lora_alpha / r) x A^T B^T (lora_alpha / sqrt(r) with use_rslora), as llamac does. The Hugging Face export permutes the rows of
wq and wk (llamac.formats.hf: RoPE's pair layout to transformers' halves); the adapters' output
side, the rows of B, is permuted the same way, and A (the input side) is left as it is.
"""
from __future__ import annotations

from llamac.formats import hf

PREFIX = "base_model.model.model.layers"
_TOKENS = "token_adapter.trainable_tokens_delta"
TOKEN_ROWS = {"tok_embeddings.token_rows": f"base_model.model.model.embed_tokens.{_TOKENS}",
              "output.token_rows": f"base_model.model.lm_head.{_TOKENS}"}


def peft_name(name: str) -> str:
    """layers.N.attention.wq.lora_a -> base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight"""
    if name in TOKEN_ROWS:
        return TOKEN_ROWS[name]
    _, i, rest = name.split(".", 2)
    projection, side = rest.rsplit(".", 1)
    module = hf.LAYER_NAMES[projection + ".weight"][: -len(".weight")]
    return f"{PREFIX}.{i}.{module}.lora_{side[-1].upper()}.weight"


def peft_tensors(adapters: dict, cfg) -> dict:
    """The adapters under PEFT's names, B of q and k permuted as the Hugging Face export permutes wq and wk."""
    out = {}
    for name, w in adapters.items():
        if name.endswith("attention.wq.lora_b"):
            w = hf.interleaved_to_halves(w, cfg.n_heads, cfg.head_size)
        elif name.endswith("attention.wk.lora_b"):
            w = hf.interleaved_to_halves(w, cfg.kv_heads, cfg.head_size)
        out[peft_name(name)] = w
    return out


def adapter_config(lora_state: dict, tied: bool = True) -> dict:
    """adapter_config.json; `tied`: the base's head is its embedding (one set of token rows for both)."""
    ids = list(lora_state.get("token_ids", []))
    tokens = (ids if tied else {"embed_tokens": ids, "lm_head": ids}) if ids else None
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": lora_state["base"],
        "r": lora_state["rank"], "lora_alpha": lora_state["alpha"], "lora_dropout": lora_state["dropout"],
        "target_modules": sorted(lora_state["targets"]),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": bool(lora_state.get("rslora", False)),
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "trainable_token_indices": tokens, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
