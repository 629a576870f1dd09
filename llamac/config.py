"""Typed recipes: YAML in, dataclasses out, unknown keys are errors.

A recipe has sections (`tokenizer`, `data`, `model`, `train`, `sft`) beside a few
top-level keys (`out_dir`, `seed`, `device`). `--set train.lr=3e-4` overrides a
value; the value is parsed as YAML, so `--set data.sources=[a.txt]` is a list.

Every number carries its allowed range beside its default (`bounded`), and
`load_recipe` checks them all before any work starts; NaN and infinities are
never allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from llamac.errors import LlamacError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

SEED_MAX = 2**32 - 1        # SentencePiece and the GPU sampler take 32-bit seeds

Bound = Union[int, float, str, None]    # a number, or the dotted key of the recipe value that bounds this one


@dataclass(frozen=True)
class Range:
    """The values a number may take: gt/ge below, lt/le above; any unset bound is open.
    A bound given as a dotted recipe key ('train.lr') is another value of the same recipe."""
    gt: Bound = None
    ge: Bound = None
    lt: Bound = None
    le: Bound = None
    note: str = ""          # what a special value means, said with the range

    def violation(self, value, lookup: Optional[Callable[[str], Any]] = None) -> Optional[str]:
        """None when `value` is allowed, else 'must be <range>, got <value>'. Key bounds are
        resolved by `lookup`; without it (or where it finds nothing) they are left unchecked."""
        bounds = {}
        for op in ("gt", "ge", "lt", "le"):
            bound = getattr(self, op)
            if isinstance(bound, str):
                resolved = lookup(bound) if lookup is not None else None
                bound = None if resolved is None else (resolved, f"{bound} = {resolved!r}")
            elif bound is not None:
                bound = (bound, repr(bound))
            if bound is not None:
                bounds[op] = bound
        finite = not isinstance(value, float) or math.isfinite(value)
        ok = finite and all(_COMPARE[op](value, bound) for op, (bound, _) in bounds.items())
        if ok:
            return None
        low = bounds.get("gt") or bounds.get("ge")
        high = bounds.get("lt") or bounds.get("le")
        if low and high:
            text = (f"in {'(' if 'gt' in bounds else '['}{low[1]}, {high[1]}"
                    f"{')' if 'lt' in bounds else ']'}")
        else:
            text = " and ".join(f"{_SYMBOL[op]} {shown}" for op, (_, shown) in bounds.items())
        text = ("finite" + (f" and {text}" if text else "")) if not finite else text
        return f"must be {text}{f' ({self.note})' if self.note else ''}, got {value!r}"


_COMPARE = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}
_SYMBOL = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def bounded(default, **bounds):
    """A dataclass field whose value must lie in Range(**bounds)."""
    return field(default=default, metadata={"range": Range(**bounds)})


@dataclass
class TokenizerConfig:
    path: Optional[str] = None          # an existing SentencePiece model; trained into out_dir when None
    vocab_size: int = bounded(8192, ge=1)   # for a newly trained model (at least tokenizer.min_vocab_size)
    model_type: str = "bpe"
    input_sentence_size: int = bounded(2_000_000, ge=0, note="0: all")  # sentences sampled to train it
    user_defined_symbols: list = field(default_factory=list)


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["builtin:classics"])
    text_field: str = "text"            # JSONL field holding the text
    glob: str = "**/*.txt"              # files taken from a directory source
    val_fraction: float = bounded(0.01, ge=0, lt=1)     # documents held out for validation
    seq_len: int = bounded(256, ge=1, le="model.max_seq_len")
    shard_dir: Optional[str] = None     # default: <out_dir>/data
    num_workers: Optional[int] = bounded(None, ge=1)  # threads for the tokenizer and encoding (None: all cores)


@dataclass
class ModelConfig:
    dim: int = bounded(288, ge=1)
    n_layers: int = bounded(6, ge=1)
    n_heads: int = bounded(6, ge=1)
    n_kv_heads: Optional[int] = bounded(None, ge=1)    # None: same as n_heads
    head_dim: Optional[int] = bounded(None, ge=2)      # None: dim // n_heads; even (RoPE rotates pairs)
    hidden_dim: Optional[int] = bounded(None, ge=1)    # None: from multiple_of / ffn_dim_multiplier as in Llama
    multiple_of: int = bounded(32, ge=1)
    ffn_dim_multiplier: Optional[float] = bounded(None, gt=0)
    vocab_size: int = bounded(8192, ge=1)
    max_seq_len: int = bounded(256, ge=1)
    rope_theta: float = bounded(10000.0, gt=0)
    rope_scaling: Optional[dict] = None  # {type: linear|dynamic|llama3, factor: ..., ...}
    norm_eps: float = bounded(1e-5, gt=0)
    tie_embeddings: bool = True
    dropout: float = bounded(0.0, ge=0, lt=1)

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
    batch_size: int = bounded(32, ge=1)
    grad_accum: int = bounded(1, ge=1)
    max_steps: int = bounded(1000, ge=1)
    lr: float = bounded(1e-3, gt=0)
    min_lr: float = bounded(1e-4, ge=0, le="train.lr")     # where the cosine decay ends
    warmup_steps: int = bounded(100, ge=0, le="train.max_steps")
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    grad_clip: float = bounded(1.0, ge=0, note="0: no clipping")   # on the global gradient norm
    # fp32 | bf16 (mixed precision: fp32 masters and AdamW state; the GPU computes in bf16, the CPU
    # multiplies its matrices in bf16 where it can) | auto (bf16 where the processor multiplies bf16 natively)
    dtype: str = "fp32"
    cuda_graph: bool = True             # GPU: replay forward+backward as a CUDA graph (static shapes, no dropout)
    recompute: bool = False             # keep only each layer's input; recompute the rest in the backward
    # data parallel: 1 shards AdamW's moments (and the fp32 masters of a bf16 model) across the ranks (ZeRO-1)
    zero: int = bounded(0, ge=0, le=1, note="0: every rank holds the whole optimizer state; 1: ZeRO-1")
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(200, ge=0, note="0: at the end only")
    eval_batches: int = bounded(20, ge=1)
    ckpt_every: int = bounded(200, ge=0, note="0: at the end only")
    keep_checkpoints: int = bounded(2, ge=0, note="0: keep every checkpoint")
    sample_every: int = bounded(0, ge=0, note="0: a sample at the end only")
    sample_prompt: str = "The"
    # with the tokenized prompt, within model.max_seq_len: pretrain checks that before training
    sample_tokens: int = bounded(64, ge=0, note="0: no sample")
    # `llamac eval` tasks scored at every evaluation beside the validation loss (llamac.eval.tasks)
    eval_tasks: list = field(default_factory=list)
    eval_limit: int = bounded(100, ge=1)      # items (bpb: documents) of each of them per evaluation


# The projections LoRA may adapt, by their Hugging Face (and PEFT) names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = bounded(16, ge=1)           # at most the smaller side of every target projection
    alpha: float = bounded(32.0, gt=0)      # the adapter's product is scaled by alpha / rank
    dropout: float = bounded(0.0, ge=0, lt=1)   # on the adapter's input only
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    rslora: bool = False                    # scale by alpha / sqrt(rank) instead (rank-stabilized, PEFT's use_rslora)
    # train the embedding rows (and an untied head's) of the chat template's special tokens, which
    # pretraining never saw (PEFT's trainable_token_indices)
    chat_tokens: bool = True


@dataclass
class SFTConfig:
    from_checkpoint: Optional[str] = None    # llamac checkpoint or Hugging Face Llama folder
    eval_tasks: int = bounded(200, ge=0)    # held-out skill prompts scored before and after
    lora: Optional[LoRAConfig] = None       # low-rank adapters on a frozen base; None: full fine-tuning


@dataclass
class Recipe:
    out_dir: str = "runs/default"
    seed: int = bounded(1337, ge=0, le=SEED_MAX)
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
        section = _section_type(tp)
        if section is not None and (value is not None or section is tp):
            kwargs[key] = _build(section, value, path)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            raise LlamacError(f"recipe key '{path}' should be {_type_name(tp)}, got {value!r}")
        kwargs[key] = conv
    return cls(**kwargs)


def _section_type(tp):
    """The dataclass of a section key (`model`), or of an optional one (`sft.lora`, None: off)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if sections else None
    return None


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


# rope_scaling is a free-form mapping (as in Hugging Face configs): the numbers model.py reads.
ROPE_SCALING_RANGES = {
    "factor": Range(ge=1),
    "original_max_position_embeddings": Range(ge=1),
    "low_freq_factor": Range(gt=0),
    "high_freq_factor": Range(gt="model.rope_scaling.low_freq_factor"),     # llama3 divides by the gap
}
LLAMA3_FREQ_FACTORS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}     # model.py's defaults


def _bounded_values(obj, where: str = ""):
    """(dotted key, value, Range) of every set value of a bounded field, sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            yield from _bounded_values(value, path)
        elif "range" in f.metadata and value is not None:
            yield path, value, f.metadata["range"]


def _rope_scaling_values(m: ModelConfig):
    scaling = dict(m.rope_scaling or {})
    if scaling.get("type", scaling.get("rope_type")) == "llama3":
        scaling = {**LLAMA3_FREQ_FACTORS, **scaling}
    for key, rng in ROPE_SCALING_RANGES.items():
        if key not in scaling:
            continue
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LlamacError(f"recipe key 'model.rope_scaling.{key}' should be a number, got {value!r}")
        yield f"model.rope_scaling.{key}", float(value), rng


def check_ranges(recipe: Recipe) -> None:
    """Every number against its Range: each value's own bounds first, then the bounds that name
    another value (so that value is known to be sound when it is quoted)."""
    values = [*_bounded_values(recipe), *_rope_scaling_values(recipe.model)]
    known = {path: value for path, value, _ in values}
    for lookup in (None, known.get):
        for path, value, rng in values:
            problem = rng.violation(value, lookup)
            if problem:
                raise LlamacError(f"recipe key '{path}' {problem}")


def validate(recipe: Recipe) -> None:
    check_ranges(recipe)
    m, t, tok = recipe.model, recipe.train, recipe.tokenizer
    if tok.path is None:
        from llamac.data.tokenizer import min_vocab_size
        problem = Range(ge=min_vocab_size(tok.user_defined_symbols),
                        note="a new tokenizer holds <unk> <s> </s>, its special tokens, 256 byte pieces, "
                             "the space piece and the text's characters").violation(tok.vocab_size)
        if problem:
            raise LlamacError(f"recipe key 'tokenizer.vocab_size' {problem}")
    n_kv = m.n_kv_heads or m.n_heads
    if m.n_heads % n_kv:
        raise LlamacError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({n_kv})")
    if m.head_dim is None and m.dim % m.n_heads:
        raise LlamacError(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads}) or set model.head_dim")
    if m.head_dim is not None and m.head_dim % 2:
        raise LlamacError(f"recipe key 'model.head_dim' must be even (RoPE rotates pairs of dimensions), got {m.head_dim}")
    if m.head_dim is None and (m.dim // m.n_heads) % 2:
        raise LlamacError(f"model.dim // model.n_heads ({m.dim} // {m.n_heads} = {m.dim // m.n_heads}) must be even "
                          "(RoPE rotates pairs of dimensions), or set model.head_dim")
    if t.recompute and m.dropout > 0:
        raise LlamacError("train.recompute needs model.dropout 0 (a recomputed layer would draw new dropout masks)")
    if t.eval_tasks:
        from llamac.eval.tasks import parse_tasks
        try:
            parse_tasks(t.eval_tasks)
        except LlamacError as exc:
            raise LlamacError(f"recipe key 'train.eval_tasks': {exc}") from None
    if t.dtype not in ("fp32", "bf16", "auto"):
        raise LlamacError(f"train.dtype must be fp32, bf16 or auto, got {t.dtype!r}")
    if recipe.sft.lora is not None:
        targets = recipe.sft.lora.targets
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise LlamacError(f"recipe key 'sft.lora.targets' has {'unknown target ' + repr(unknown[0]) if unknown else 'no target'}"
                              f" (choose among {', '.join(LORA_TARGETS)})")
        if len(set(targets)) != len(targets):
            raise LlamacError(f"recipe key 'sft.lora.targets' names a target twice: {targets}")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type"))
        if kind not in ("linear", "dynamic", "llama3"):
            raise LlamacError(f"model.rope_scaling.type must be linear, dynamic or llama3, got {kind!r}")
