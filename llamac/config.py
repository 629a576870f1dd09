"""Typed recipes: YAML in, dataclasses out, unknown keys are errors.

A recipe has sections (`tokenizer`, `data`, `model`, `train`, `sft`) beside a few
top-level keys (`out_dir`, `seed`, `device`). `--set train.lr=3e-4` overrides a
value; the value is parsed as YAML, so `--set data.sources=[a.txt]` is a list.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from llamac.errors import LlamacError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TokenizerConfig:
    path: Optional[str] = None          # an existing SentencePiece model; trained into out_dir when None
    vocab_size: int = 8192              # for a newly trained model
    model_type: str = "bpe"
    input_sentence_size: int = 2_000_000  # sentences sampled to train it (0: all)
    user_defined_symbols: list = field(default_factory=list)


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["builtin:classics"])
    text_field: str = "text"            # JSONL field holding the text
    glob: str = "**/*.txt"              # files taken from a directory source
    val_fraction: float = 0.01          # documents held out for validation
    seq_len: int = 256
    shard_dir: Optional[str] = None     # default: <out_dir>/data
    num_workers: Optional[int] = None   # threads for training the tokenizer and encoding (None: all cores)


@dataclass
class ModelConfig:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None    # None: same as n_heads
    head_dim: Optional[int] = None      # None: dim // n_heads
    hidden_dim: Optional[int] = None    # None: from multiple_of / ffn_dim_multiplier as in Llama
    multiple_of: int = 32
    ffn_dim_multiplier: Optional[float] = None
    vocab_size: int = 8192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {type: linear|dynamic|llama3, factor: ..., ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0

    # The sizes the model is built with. The optional fields above keep what the recipe says (None
    # stays None in to_dict(), saved recipes and checkpoints); these fill in Llama's defaults.
    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads (no grouping) when None."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Channels per attention head: head_dim, or dim // n_heads when None."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU's hidden size: hidden_dim, or Llama's rule when None: 2/3 of 4 * dim,
        times ffn_dim_multiplier when set, rounded up to a multiple of multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"                 # fp32 | bf16 (mixed precision on the GPU)
    cuda_graph: bool = True             # GPU: replay forward+backward as a CUDA graph (static shapes, no dropout)
    recompute: bool = False             # keep only each layer's input; recompute the rest in the backward
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 0               # 0: print a sample at the end only
    sample_prompt: str = "The"
    sample_tokens: int = 64


@dataclass
class SFTConfig:
    from_checkpoint: Optional[str] = None    # llamac checkpoint or Hugging Face Llama folder
    eval_tasks: int = 200


@dataclass
class Recipe:
    out_dir: str = "runs/default"
    seed: int = 1337
    device: str = "auto"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- strict loading

def _type_ok(value, tp) -> tuple[bool, Any]:
    """Check `value` against annotation `tp`; returns (ok, value converted where harmless)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, conv = _type_ok(value, arg)
                if ok:
                    return True, conv
        return False, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        if isinstance(value, str):  # a single source is a one-element list
            return True, [value]
        return isinstance(value, list), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LlamacError(f"recipe section '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise LlamacError(
            f"unknown key '{unknown[0]}' in recipe section '{where or 'top level'}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            raise LlamacError(f"recipe key '{path}' should be {_type_name(tp)}, got {value!r}")
        kwargs[key] = conv
    return cls(**kwargs)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` pairs onto a nested dict; values parsed as YAML."""
    for item in overrides or []:
        if "=" not in item:
            raise LlamacError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw     # not YAML (e.g. a glob like **/*.py): take the text as it is
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LlamacError(f"--set {dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LlamacError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LlamacError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LlamacError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the defaults when path is None), apply --set overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    m, t, d = recipe.model, recipe.train, recipe.data
    positive = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.vocab_size": m.vocab_size, "model.max_seq_len": m.max_seq_len,
                "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.max_steps": t.max_steps, "data.seq_len": d.seq_len}
    for key, value in positive.items():
        if value <= 0:
            raise LlamacError(f"recipe key '{key}' must be positive, got {value}")
    n_kv = m.n_kv_heads or m.n_heads
    if m.n_heads % n_kv:
        raise LlamacError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({n_kv})")
    if m.head_dim is None and m.dim % m.n_heads:
        raise LlamacError(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads}) or set model.head_dim")
    if d.seq_len > m.max_seq_len:
        raise LlamacError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if not 0.0 <= d.val_fraction < 1.0:
        raise LlamacError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if t.recompute and m.dropout > 0:
        raise LlamacError("train.recompute needs model.dropout 0 (a recomputed layer would draw new dropout masks)")
    if t.dtype not in ("fp32", "bf16"):
        raise LlamacError(f"train.dtype must be fp32 or bf16, got {t.dtype!r}")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type"))
        if kind not in ("linear", "dynamic", "llama3"):
            raise LlamacError(f"model.rope_scaling.type must be linear, dynamic or llama3, got {kind!r}")
