"""Recipe and CLI numbers are range-checked before any work starts, each failure one line naming the key."""
import dataclasses
import typing

import pytest

from llamac.cli import main
from llamac.config import RECIPE_DIR, ROPE_SCALING_RANGES, Range, Recipe, load_recipe
from llamac.errors import LlamacError

# (key, a value out of range, what the error says, a value on the boundary that is accepted, or that
# value and the other overrides it needs). Defaults around them: train.lr 1e-3, train.max_steps 1000,
# model.max_seq_len 256.
RANGES = [
    ("seed", "-1", "'seed' must be in [0, 4294967295], got -1", "0"),
    ("seed", "4294967296", "'seed' must be in [0, 4294967295]", "4294967295"),
    ("tokenizer.vocab_size", "0", "'tokenizer.vocab_size' must be >= 1, got 0", "269"),
    ("tokenizer.vocab_size", "268", "'tokenizer.vocab_size' must be >= 269 (a new tokenizer holds", "269"),
    ("tokenizer.input_sentence_size", "-1", "'tokenizer.input_sentence_size' must be >= 0 (0: all)", "0"),
    ("data.val_fraction", "1", "'data.val_fraction' must be in [0, 1), got 1.0", "0"),
    ("data.val_fraction", "-0.01", "'data.val_fraction' must be in [0, 1)", "0.99"),
    ("data.seq_len", "0", "'data.seq_len' must be >= 1, got 0", "1"),
    ("data.seq_len", "257", "'data.seq_len' must be in [1, model.max_seq_len = 256], got 257", "256"),
    ("data.num_workers", "0", "'data.num_workers' must be >= 1, got 0", "1"),
    ("model.dim", "0", "'model.dim' must be >= 1, got 0", ("1", "model.n_heads=1", "model.head_dim=2")),
    ("model.n_layers", "0", "'model.n_layers' must be >= 1", "1"),
    ("model.n_heads", "-2", "'model.n_heads' must be >= 1", "1"),
    ("model.n_kv_heads", "0", "'model.n_kv_heads' must be >= 1", "1"),
    ("model.head_dim", "0", "'model.head_dim' must be >= 2, got 0", "2"),
    ("model.head_dim", "15", "'model.head_dim' must be even", "16"),
    ("model.hidden_dim", "0", "'model.hidden_dim' must be >= 1", "1"),
    ("model.multiple_of", "0", "'model.multiple_of' must be >= 1", "1"),
    ("model.ffn_dim_multiplier", "0", "'model.ffn_dim_multiplier' must be > 0", "0.01"),
    ("model.vocab_size", "0", "'model.vocab_size' must be >= 1", "1"),
    ("model.max_seq_len", "0", "'model.max_seq_len' must be >= 1", ("1", "data.seq_len=1")),
    ("model.rope_theta", "0", "'model.rope_theta' must be > 0, got 0.0", "1.0e-6"),
    ("model.rope_theta", ".inf", "'model.rope_theta' must be finite and > 0, got inf", "500000"),
    ("model.norm_eps", "0", "'model.norm_eps' must be > 0", "1.0e-12"),
    ("model.dropout", "1", "'model.dropout' must be in [0, 1), got 1.0", "0"),
    ("model.dropout", "-0.1", "'model.dropout' must be in [0, 1)", "0.99"),
    ("model.rope_scaling", "{type: linear, factor: 0.5}", "'model.rope_scaling.factor' must be >= 1, got 0.5",
     "{type: linear, factor: 1}"),
    ("model.rope_scaling", "{type: linear, factor: big}", "'model.rope_scaling.factor' should be a number",
     "{type: linear, factor: 2}"),
    ("model.rope_scaling", "{type: dynamic, factor: 2, original_max_position_embeddings: 0}",
     "'model.rope_scaling.original_max_position_embeddings' must be >= 1",
     "{type: dynamic, factor: 2, original_max_position_embeddings: 1}"),
    ("model.rope_scaling", "{type: llama3, factor: 8, low_freq_factor: 0}",
     "'model.rope_scaling.low_freq_factor' must be > 0", "{type: llama3, factor: 8, low_freq_factor: 0.5}"),
    ("model.rope_scaling", "{type: llama3, factor: 8, low_freq_factor: 4}",     # high defaults to 4
     "'model.rope_scaling.high_freq_factor' must be > model.rope_scaling.low_freq_factor = 4.0, got 4.0",
     "{type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 4.5}"),
    ("train.batch_size", "0", "'train.batch_size' must be >= 1", "1"),
    ("train.grad_accum", "0", "'train.grad_accum' must be >= 1", "1"),
    ("train.max_steps", "0", "'train.max_steps' must be >= 1", "100"),
    ("train.lr", "-1", "'train.lr' must be > 0, got -1.0", "1.0e-3"),
    ("train.lr", "0", "'train.lr' must be > 0, got 0.0", "1.0e+30"),
    ("train.lr", ".nan", "'train.lr' must be finite and > 0, got nan", "1"),
    ("train.lr", ".inf", "'train.lr' must be finite and > 0, got inf", "1"),
    ("train.min_lr", "-1.0e-5", "'train.min_lr' must be >= 0, got -1e-05", "0"),
    ("train.min_lr", "2.0e-3", "'train.min_lr' must be in [0, train.lr = 0.001], got 0.002", "1.0e-3"),
    ("train.warmup_steps", "-1", "'train.warmup_steps' must be >= 0", "0"),
    ("train.warmup_steps", "1001", "'train.warmup_steps' must be in [0, train.max_steps = 1000], got 1001", "1000"),
    ("train.weight_decay", "-0.1", "'train.weight_decay' must be >= 0", "0"),
    ("train.beta1", "1", "'train.beta1' must be in [0, 1), got 1.0", "0"),
    ("train.beta2", "1", "'train.beta2' must be in [0, 1)", "0.999"),
    ("train.beta2", "-.inf", "'train.beta2' must be finite and in [0, 1), got -inf", "0.95"),
    ("train.eps", "0", "'train.eps' must be > 0", "1.0e-30"),
    ("train.grad_clip", "-1", "'train.grad_clip' must be >= 0 (0: no clipping), got -1.0", "0"),
    ("train.grad_clip", ".nan", "'train.grad_clip' must be finite", "0"),
    ("train.log_every", "0", "'train.log_every' must be >= 1", "1"),
    ("train.eval_every", "-1", "'train.eval_every' must be >= 0 (0: at the end only)", "0"),
    ("train.eval_batches", "0", "'train.eval_batches' must be >= 1", "1"),
    ("train.ckpt_every", "-1", "'train.ckpt_every' must be >= 0", "0"),
    ("train.keep_checkpoints", "-1", "'train.keep_checkpoints' must be >= 0 (0: keep every checkpoint)", "0"),
    ("train.sample_every", "-1", "'train.sample_every' must be >= 0", "0"),
    ("train.sample_tokens", "-1", "'train.sample_tokens' must be >= 0", "0"),
    ("train.eval_limit", "0", "'train.eval_limit' must be >= 1", "1"),
    ("sft.eval_tasks", "-1", "'sft.eval_tasks' must be >= 0", "0"),
]


@pytest.mark.parametrize("key,bad,message,good", RANGES, ids=[f"{r[0]}={r[1]}" for r in RANGES])
def test_recipe_number_out_of_range_is_named_and_the_boundary_accepted(key, bad, message, good):
    with pytest.raises(LlamacError) as info:
        load_recipe(None, [f"{key}={bad}"])
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    good, *others = (good,) if isinstance(good, str) else good
    load_recipe(None, [f"{key}={good}", *others])


def test_derived_head_dim_must_be_even():
    with pytest.raises(LlamacError, match=r"model.dim // model.n_heads \(60 // 4 = 15\) must be even"):
        load_recipe(None, ["model.dim=60", "model.n_heads=4"])
    load_recipe(None, ["model.dim=60", "model.n_heads=4", "model.head_dim=16"])


def test_vocab_floor_counts_user_symbols_and_skips_a_given_tokenizer():
    with pytest.raises(LlamacError, match=r"must be >= 271"):
        load_recipe(None, ["tokenizer.vocab_size=270", "tokenizer.user_defined_symbols=[<a>, <b>, <|user|>]"])
    load_recipe(None, ["tokenizer.vocab_size=100", "tokenizer.path=some.model"])


def test_min_vocab_size_is_what_sentencepiece_needs(tmp_path):
    from llamac.data.tokenizer import min_vocab_size, train_tokenizer
    train_tokenizer(["a" * 3000], tmp_path / "t", min_vocab_size(), input_sentence_size=0)
    with pytest.raises(LlamacError, match="too small"):
        train_tokenizer(["a" * 3000], tmp_path / "u", min_vocab_size() - 1, input_sentence_size=0)


def _numeric(tp) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    return any(a in (int, float) for a in args)


def test_every_recipe_number_has_a_range_and_key_bounds_name_bounded_keys():
    bounded, references = set(), []
    sections = {"": Recipe, **{k: tp for k, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)}}
    for where, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not _numeric(hints[f.name]):
                continue
            assert isinstance(f.metadata.get("range"), Range), f"{where}.{f.name} has no range"
            bounded.add(f"{where}.{f.name}" if where else f.name)
            references += [b for b in vars(f.metadata["range"]).values() if isinstance(b, str) and "." in b]
    bounded |= {f"model.rope_scaling.{k}" for k in ROPE_SCALING_RANGES}
    references += [b for r in ROPE_SCALING_RANGES.values() for b in vars(r).values() if isinstance(b, str) and "." in b]
    assert references and set(references) <= bounded


def test_shipped_recipes_are_in_range():
    for path in sorted(RECIPE_DIR.glob("*/*.yaml")):
        load_recipe(path)


# ---------------------------------------------------------------- through the command line

def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(map(str, argv)))
    assert info.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("option,value,message", [
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--temperature", "-0.5", "--temperature must be >= 0 (0: greedy), got -0.5"),
    ("--temperature", "nan", "--temperature must be finite and >= 0"),
    ("--temperature", "inf", "--temperature must be finite and >= 0"),
    ("--top-k", "-1", "--top-k must be >= 0 (0: off), got -1"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
])
def test_generate_options_out_of_range_fail_before_the_model_loads(tmp_path, capsys, option, value, message):
    # the checkpoint does not exist: the range is what stops it
    line = _cli_error(capsys, "generate", "-c", tmp_path / "nowhere", "--prompt", "x", option, value)
    assert message in line, line


def test_generate_boundary_options_pass_the_range_check(tmp_path, capsys):
    line = _cli_error(capsys, "generate", "-c", tmp_path / "nowhere", "--prompt", "x", "--max-new-tokens", "1",
                      "--temperature", "0", "--top-k", "0", "--top-p", "1", "--seed", "4294967295")
    assert "checkpoint not found" in line, line


def test_recipe_range_error_through_the_cli(tmp_path, capsys):
    line = _cli_error(capsys, "pretrain", "--set", f"out_dir={tmp_path}", "--set", "train.lr=-1")
    assert line == "error: recipe key 'train.lr' must be > 0, got -1.0"
    assert not any(tmp_path.iterdir())           # nothing was started
    line = _cli_error(capsys, "tokenize", RECIPE_DIR / "pretrain" / "debug.yaml", "--set", f"out_dir={tmp_path}",
                      "--set", "train.min_lr=1")
    assert "'train.min_lr' must be in [0, train.lr = 0.003]" in line


@pytest.mark.parametrize("argv,message", [
    (["export", "x", "-f", "gguf", "-o", "y", "--dtype", "q4"], "--dtype q4 is not available"),
    (["export", "x", "-f", "onnx", "-o", "y"], "unsupported export format 'onnx'"),
    (["bench", "--what", "nothing"], "unknown bench section 'nothing'"),
    (["eval", "-c", "x", "--tasks", "hellaswag"], "unknown eval task 'hellaswag'"),
    (["pretrain", "--set", "train.eval_tasks=[bpb, lambada]"], "'train.eval_tasks': unknown eval task 'lambada'"),
])
def test_unknown_choices_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in _cli_error(capsys, *argv)
