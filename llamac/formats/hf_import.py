"""Hugging Face Llama folders (config.json + safetensors + tokenizer.model) read as llamac models.

`llamac generate`, `sft --from` and `export` take such a folder wherever they take a checkpoint
(`checkpoint.load_model` dispatches here); the weights are converted on load: names mapped and
wq/wk rows permuted from transformers' rotate-half layout back to llamac's interleaved pairs
(llamac.formats.hf).
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamac.config import ModelConfig
from llamac.errors import LlamacError
from llamac.formats import hf

INDEX = "model.safetensors.index.json"


@dataclass
class Source:
    """A model to export, whatever it was read from: llamac names, float32 NumPy weights."""
    config: ModelConfig
    state: dict
    path: Path
    tokenizer_path: Path | None = None
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)   # state.json keys worth carrying over (llamac sources)
    # a LoRA run's adapters: {"state": its state.json 'lora' entry, "tensors": lora_a / lora_b by name};
    # `state` then holds the base with them merged
    lora: dict | None = None


def is_hf_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "state.json").is_file()


# ------------------------------------------------------------------ safetensors, bf16 included

def _st_dtypes() -> dict:
    import ml_dtypes  # safetensors.numpy can't read BF16, the dtype most Hugging Face Llamas ship in
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(name -> array, metadata) of one .safetensors file, by its documented layout:
    8-byte little-endian header length, a JSON header, then the raw tensor bytes."""
    dtypes = _st_dtypes()
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        tensors = {}
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dt = np.dtype(dtypes[info["dtype"]])
            arr = np.frombuffer(buf, dtype=dt, count=(end - start) // dt.itemsize, offset=base + start)
            tensors[name] = arr.reshape(info["shape"])
        return tensors, header.get("__metadata__") or {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlamacError(f"corrupt or unreadable weights file {path}: {exc}") from None


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise LlamacError(f"unreadable {folder / INDEX}: {exc}") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = "; pytorch_model.bin is not read (re-save it with safe_serialization=True)" \
            if any(folder.glob("*.bin")) else ""
        raise LlamacError(f"{folder} has config.json but no .safetensors weights{bins}")
    return files


# ------------------------------------------------------------------ reading a folder

def read_hf_folder(folder) -> Source:
    """The model in a Hugging Face Llama folder, in llamac's layout (float32)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LlamacError(f"unreadable {folder / 'config.json'}: {exc}") from None
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise LlamacError(f"{folder} holds {archs[0]}, not LlamaForCausalLM (llamac reads Llama models)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise LlamacError(f"{folder}: {key}=true is not supported (llamac's Llama has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise LlamacError(f"{folder}: hidden_act={config['hidden_act']!r} is not supported (llamac uses silu)")
    cfg = hf.model_config_from_hf(config)
    tensors = {}
    for path in _weight_files(folder):
        tensors.update(read_safetensors(path)[0])
    tied = cfg.tie_embeddings
    if not tied and "lm_head.weight" not in tensors:
        raise LlamacError(f"{folder}: tie_word_embeddings is false but there is no lm_head.weight")
    state = hf.from_hf_state({k: v.astype(np.float32) for k, v in tensors.items()}, cfg, tied)
    tokenizer = folder / "tokenizer.model"
    return Source(cfg, state, folder, tokenizer if tokenizer.is_file() else None, read_chat_template(folder))


def read_chat_template(folder: Path) -> str | None:
    """transformers 4 keeps the template in tokenizer_config.json, transformers 5 in chat_template.jinja."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def load_hf_folder(path, device: str = "cpu", dtype=None):
    """(model, tokenizer or None, path): what checkpoint.load_model returns, for a Hugging Face folder."""
    from llamac.model.llama import Llama
    src = read_hf_folder(path)
    model = Llama(src.config)
    model.load_state_dict(src.state)
    model.to(device, dtype)
    tokenizer = None
    if src.tokenizer_path is not None:
        from llamac.data.tokenizer import Tokenizer
        tokenizer = Tokenizer(src.tokenizer_path)
    return model, tokenizer, Path(path)
