"""Checkpoints: a folder per step, written under a temporary name and renamed into place.

    <out_dir>/checkpoints/step_00000200/
        model.safetensors       weights (fp32), the model config in the metadata; a LoRA run's
                                adapters only (state.json names its base and the base's hash)
        optimizer.safetensors   AdamW moments (absent in exports)
        state.json              step, RNG state, data position, the resolved recipe
        tokenizer.model         the SentencePiece model the ids belong to

A folder without state.json is incomplete and ignored, so a run killed mid-write resumes
from the previous checkpoint. `latest` names the newest complete one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from llamac.config import ModelConfig, Recipe
from llamac.engine import backend
from llamac.errors import LlamacError

STATE = "state.json"


def _save_safetensors(tensors: dict, path: Path, metadata: dict | None = None):
    from safetensors.numpy import save_file
    arrays = {k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise LlamacError(f"corrupt or unreadable weights file {path}: {exc}") from None


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def save(out_dir, step: int, model, optimizer, recipe: Recipe, state: dict, tokenizer_path=None, keep: int = 2,
         weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint atomically and prune all but the newest `keep`.
    `weights` overrides the model's own (the fp32 masters of a mixed-precision run), and
    `optimizer_state` the optimizer's state_dict() (ZeRO-1's, gathered from the ranks)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_safetensors(weights if weights is not None else model.state_dict(), tmp / "model.safetensors",
                      {"format": "llamac", "model_config": json.dumps(dataclasses.asdict(model.config))})
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    if optimizer_state is not None:
        _save_safetensors(optimizer_state, tmp / "optimizer.safetensors")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    payload = {"step": step, "recipe": recipe.to_dict(), "model_config": dataclasses.asdict(model.config), **state}
    with open(tmp / STATE, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(out_dir) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file() and (p / "model.safetensors").is_file())


def latest(out_dir) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder itself, or a run's out_dir (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise LlamacError(f"checkpoint not found: {path}")
    if (path / STATE).is_file() and (path / "model.safetensors").is_file():
        return path
    newest = latest(path)
    if newest is None:
        raise LlamacError(f"{path} is not a llamac checkpoint (no {STATE} and model.safetensors, "
                          "and no checkpoints/ folder with one)")
    return newest


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LlamacError(f"corrupt checkpoint {ckpt}: {STATE} unreadable ({exc})") from None


def model_config_of(ckpt: Path) -> ModelConfig:
    data = read_state(ckpt)["model_config"]
    return ModelConfig(**data)


def load_model(path, device: str = "cpu", dtype=None):
    """(model, tokenizer or None, checkpoint path) from a llamac checkpoint or a Hugging Face Llama folder.
    A LoRA checkpoint gives its base with the adapters merged (its base is checked by hash first)."""
    from llamac.model.llama import Llama
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / STATE).is_file():
        from llamac.formats.hf_import import load_hf_folder
        return load_hf_folder(path, device=device, dtype=dtype)
    ckpt = resolve_checkpoint(path)
    cfg = model_config_of(ckpt)
    weights = model_weights(ckpt, read_state(ckpt))     # a LoRA run: base + adapters, merged in memory
    model = Llama(cfg)
    model.load_state_dict(weights)
    model.to(device, dtype)
    tokenizer = None
    if (ckpt / "tokenizer.model").is_file():
        from llamac.data.tokenizer import Tokenizer
        tokenizer = Tokenizer(ckpt / "tokenizer.model")
    return model, tokenizer, ckpt


def check_compatible(ckpt: Path, cfg: ModelConfig):
    """Resuming a run under a recipe whose model differs from the checkpoint's is an error."""
    saved = model_config_of(ckpt)
    if saved != cfg:
        diffs = [f"model.{f.name}={getattr(saved, f.name)!r} (recipe: {getattr(cfg, f.name)!r})"
                 for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
        raise LlamacError(f"checkpoint {ckpt} is from an incompatible config: {'; '.join(diffs[:3])}; "
                          "use --no-resume or another out_dir")


def trainable_parameters(model) -> list:
    """(name, parameter) of every parameter that takes a gradient."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def load_trainable(model, weights: dict, ckpt):
    """A checkpoint's weights into the parameters that train (all of them, or a LoRA run's adapters);
    any other set of names is a checkpoint of another kind of run."""
    names = {n for n, _ in trainable_parameters(model)}
    if set(weights) != names:
        parts = [f"{what} {', '.join(sorted(which)[:3])}" for what, which in
                 (("missing", names - set(weights)), ("unexpected", set(weights) - names)) if which]
        raise LlamacError(f"checkpoint {ckpt} does not hold what this run trains ({'; '.join(parts)}); "
                          "use --no-resume or another out_dir")
    model.load_state_dict(weights, strict=False)


# ---------------------------------------------------------------- LoRA checkpoints: adapters on a base

def model_weights(ckpt: Path, state: dict) -> dict:
    """A checkpoint's full model weights: its own, or (a LoRA run) its base's with the adapters merged."""
    weights, _ = load_safetensors(ckpt / "model.safetensors")
    if "lora" not in state:
        return weights
    from llamac.train import lora
    return lora.merge_adapters(lora_base_weights(ckpt, state["lora"]), weights, state["lora"])


def lora_base_weights(ckpt: Path, lora_state: dict) -> dict:
    """The base a LoRA checkpoint was trained on, as float32 weights, checked against its stored hash."""
    from llamac.train import lora
    base = Path(lora_state["base"])
    if not base.exists():
        raise LlamacError(f"LoRA checkpoint {ckpt}: its base model {base} is missing")
    weights = base_weights(base)
    found = lora.weights_hash(weights)
    if found != lora_state["base_hash"]:
        raise LlamacError(f"LoRA checkpoint {ckpt}: its base {base} is not the model it was trained on "
                          f"(weights hash {found[:19]}..., the checkpoint's {lora_state['base_hash'][:19]}...)")
    return weights


def base_weights(path) -> dict:
    """float32 weights in llamac's layout of a model folder: a llamac checkpoint or a Hugging Face Llama."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / STATE).is_file():
        from llamac.formats.hf_import import read_hf_folder
        return read_hf_folder(path).state
    ckpt = resolve_checkpoint(path)
    return {k: np.asarray(v, np.float32) for k, v in model_weights(ckpt, read_state(ckpt)).items()}
