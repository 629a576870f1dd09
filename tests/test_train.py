"""Pretraining end to end on the debug recipe: overfitting, resume after SIGKILL, generation, errors."""
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llamac
from llamac.config import load_recipe
from llamac.errors import LlamacError
from llamac.infer.generate import generate_ids
from llamac.model.llama import Llama
from llamac.train import checkpoint
from llamac.train.loop import Trainer, build_model, document_segments, pretrain

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "pretrain" / "debug.yaml"


def debug_recipe(tmp_path, shard_dir, *overrides):
    return load_recipe(DEBUG, [f"out_dir={tmp_path / 'run'}", f"data.shard_dir={shard_dir}", *overrides])


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llamac", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_debug_recipe_overfits_one_batch(tmp_path, shard_dir):
    from llamac.data.loader import TokenLoader
    from llamac.data.pipeline import prepare_data
    recipe = debug_recipe(tmp_path, shard_dir, "train.max_steps=200", "train.warmup_steps=10",
                          "train.eval_every=0", "train.ckpt_every=0", "train.log_every=50")
    info = prepare_data(recipe, verbose=False)
    loader = TokenLoader(info.train_path, recipe.data.seq_len, recipe.train.batch_size, recipe.seed)
    x, y = loader.get_batch(0)
    model = build_model(recipe, info.vocab_size, "cpu")
    segments = document_segments(x, 1)
    trainer = Trainer(recipe, model, "cpu", lambda step, micro: (x, y, segments),
                      lambda m: {"val_loss": m(x, y, segment_ids=segments)[1].item()})
    summary = trainer.run(resume=False)
    assert summary["val_loss"] < 0.1, summary


def _final_loss(out_dir: Path) -> float:
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r][-1]["loss"]


def test_sigkill_and_resume_ends_with_the_same_loss(tmp_path, shard_dir):
    common = ["--set", f"data.shard_dir={shard_dir}", "--set", "train.max_steps=40", "--set", "train.ckpt_every=10",
              "--set", "train.sample_tokens=0", "--set", "train.eval_every=0"]
    straight = run_cli("pretrain", DEBUG, "--set", f"out_dir={tmp_path / 'a'}", *common)
    assert straight.returncode == 0, straight.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "llamac", "pretrain", str(DEBUG), "--set", f"out_dir={out_b}",
                             *common], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out_b / "checkpoints" / "step_00000020" / "state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(out_b) is not None
    killed_at = checkpoint.read_state(checkpoint.latest(out_b))["step"]
    assert killed_at < 40, "the run finished before it could be killed: make it longer"
    resumed = run_cli("pretrain", DEBUG, "--set", f"out_dir={out_b}", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from" in resumed.stderr
    assert _final_loss(out_b) == _final_loss(tmp_path / "a")
    losses_a = [r["loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    losses_b = [r["loss"] for r in map(json.loads, (out_b / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses_a == losses_b


def test_pretrain_writes_checkpoint_metrics_plot_and_sample(tmp_path, shard_dir):
    result = run_cli("pretrain", DEBUG, "--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.shard_dir={shard_dir}",
                     "--set", "train.max_steps=20")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[0])
    assert any("val_loss" in r and "val_ppl" in r for r in records)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = checkpoint.latest(run)
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "state.json",
                                                "tokenizer.model"}
    assert len(checkpoint.complete_checkpoints(run)) <= 2       # keep_checkpoints
    assert "sample" in result.stderr and result.stdout.strip()  # the sample is printed

    gen = run_cli("generate", "--checkpoint", run, "--prompt", "The king", "--max-new-tokens", "10",
                  "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The king")


def snapshot(root: Path) -> dict:
    """Every file's bytes and mtime and every folder's mtime under root: what a no-op must leave alone."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_rerunning_a_finished_run_changes_nothing_on_disk(tmp_path):
    """The debug recipe to its end (tokenizer and shards in out_dir too), then once more: nothing is
    appended, rewritten, created or removed, and the summary is the finished run's."""
    out = tmp_path / "run"
    first = pretrain(load_recipe(DEBUG, [f"out_dir={out}"]))
    before = snapshot(out)
    assert {"metrics.jsonl", "loss.png", "data/train.bin", f"checkpoints/step_{50:08d}/state.json"} <= set(before)
    again = pretrain(load_recipe(DEBUG, [f"out_dir={out}"]))
    assert snapshot(out) == before
    assert again["step"] == 50 and again["val_loss"] == first["val_loss"] and again["checkpoint"] == first["checkpoint"]
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [25, 50]


def test_loss_goes_down_on_real_text(tmp_path, shard_dir):
    recipe = debug_recipe(tmp_path, shard_dir, "train.max_steps=200", "train.sample_tokens=0", "train.log_every=2")
    from llamac.train.loop import pretrain
    pretrain(recipe, resume=False)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses


def test_build_model_and_pretrain_leave_the_recipe_alone(tmp_path, shard_dir):
    """The tokenizer's vocab_size goes into the model's config, not the caller's recipe; the
    checkpoint records the model as built (recipe and model_config alike)."""
    recipe = debug_recipe(tmp_path, shard_dir, "model.vocab_size=600", "train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=0",
                          "train.eval_every=0", "train.sample_tokens=0")
    before, model_before = copy.deepcopy(recipe), recipe.model
    model = build_model(recipe, 512, "cpu")
    assert recipe == before and recipe.model is model_before and model.config is not recipe.model
    assert model.config == dataclasses.replace(recipe.model, vocab_size=512)
    assert model.tok_embeddings.weight.shape == (512, 64)
    pretrain(recipe, resume=False)
    assert recipe == before and recipe.model is model_before
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "run"))
    assert state["recipe"]["model"] == state["model_config"] == dataclasses.asdict(model.config)
    assert state["recipe"]["model"]["n_kv_heads"] == 2 and state["recipe"]["model"]["hidden_dim"] is None


def test_kv_cache_generation_equals_recomputation():
    cfg = load_recipe(DEBUG).model
    llamac.manual_seed(0)
    model = Llama(cfg)
    for p in model.parameters():           # larger weights: peaked, tie-free distributions
        p.data = p.data * 8
    prompt = [1, 5, 9, 13, 200]
    cached = list(generate_ids(model, prompt, 30, temperature=0))
    ids = list(prompt)
    with llamac.no_grad():
        for _ in range(30):
            logits, _ = model(np.array([ids]))
            ids.append(int(logits.numpy()[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_sampling_is_reproducible_and_respects_top_k():
    from llamac.infer.generate import sample_next
    logits = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    a = [sample_next(logits, 1.0, 5, None, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == sample_next(logits, 1.0, 5, None, np.random.default_rng(7)).tolist()
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    rng = np.random.default_rng(1)
    for _ in range(50):
        picks = sample_next(logits, 1.0, 5, 0.9, rng)
        assert all(p in top5[i] for i, p in enumerate(picks))
    assert sample_next(logits, 0.0, None, None, rng).tolist() == logits.argmax(-1).tolist()


# ---------------------------------------------------------------- errors: one line, non-zero, no traceback

def _one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr   # one line, the last one
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_error_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1, 2\n")
    _one_line_error(run_cli("pretrain", bad), "malformed YAML", "bad.yaml")


def test_error_unknown_and_mistyped_keys(tmp_path):
    _one_line_error(run_cli("pretrain", DEBUG, "--set", "train.learning_rate=1"), "learning_rate", "train")
    _one_line_error(run_cli("pretrain", DEBUG, "--set", "model.dim=big"), "model.dim")
    with pytest.raises(LlamacError, match="unknown key 'colour' in recipe section 'model'"):
        load_recipe(DEBUG, ["model.colour=red"])


def test_error_missing_data_path(tmp_path):
    _one_line_error(run_cli("pretrain", DEBUG, "--set", f"out_dir={tmp_path}", "--set",
                            f"data.sources=[{tmp_path / 'nope.txt'}]"), "nope.txt")


def test_error_incompatible_checkpoint(tmp_path, shard_dir):
    ok = run_cli("pretrain", DEBUG, "--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.shard_dir={shard_dir}",
                 "--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--set", "train.sample_tokens=0")
    assert ok.returncode == 0, ok.stderr
    _one_line_error(run_cli("pretrain", DEBUG, "--set", f"out_dir={tmp_path / 'run'}", "--set",
                            f"data.shard_dir={shard_dir}", "--set", "model.dim=32", "--set", "train.max_steps=5"),
                    "incompatible", "model.dim")
    _one_line_error(run_cli("generate", "-c", tmp_path / "run", "--prompt", "Hi", "--max-new-tokens", "500"),
                    "max_seq_len")
    _one_line_error(run_cli("generate", "-c", tmp_path / "nowhere", "--prompt", "Hi"), "not found")


def test_a_sample_longer_than_the_context_fails_before_training(tmp_path, shard_dir):
    recipe = debug_recipe(tmp_path, shard_dir, "train.sample_tokens=63", "train.sample_prompt=The king")
    with pytest.raises(LlamacError, match=r"train.sample_prompt \(\d+ tokens with <s>\) \+ train.sample_tokens \(63\)"):
        pretrain(recipe)
    assert not (tmp_path / "run").exists()


def test_cuda_request_without_gpu_says_why(tmp_path):
    if llamac.engine.backend.cuda_available():
        pytest.skip("a GPU is present")
    _one_line_error(run_cli("pretrain", DEBUG, "--device", "cuda", "--set", f"out_dir={tmp_path}"), "cuda")


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, shard_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llamac", "pretrain", str(DEBUG), "--set", f"out_dir={out}",
                             "--set", f"data.shard_dir={shard_dir}", "--set", "train.max_steps=100000",
                             "--set", "train.ckpt_every=0", "--set", "train.eval_every=0"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stderr
    saved = checkpoint.read_state(checkpoint.latest(out))["step"]
    assert saved > 0                                   # no periodic checkpoints: this one came from Ctrl-C
    resumed = run_cli("pretrain", DEBUG, "--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}",
                      "--set", f"train.max_steps={saved + 3}", "--set", "train.sample_tokens=0")
    assert resumed.returncode == 0 and f"resumed from" in resumed.stderr, resumed.stderr


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, shard_dir):
    out = tmp_path / "run"
    common = ["--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}", "--set", "train.sample_tokens=0"]
    first = run_cli("pretrain", DEBUG, *common, "--set", "train.max_steps=5")
    assert first.returncode == 0, first.stderr
    # resume with an absurd learning rate: the weights blow up within a few updates
    result = run_cli("pretrain", DEBUG, *common, "--set", "train.max_steps=40", "--set", "train.lr=1.0e+30",
                     "--set", "train.grad_clip=0", "--set", "train.ckpt_every=1")
    _one_line_error(result, "NaN", "Last good checkpoint")
    named = Path(result.stderr.split("Last good checkpoint: ")[1].split(" (")[0])
    assert named == checkpoint.latest(out) and named.name >= "step_00000005"
    from llamac.train.checkpoint import load_safetensors
    weights, _ = load_safetensors(named / "model.safetensors")
    assert all(np.isfinite(w).all() for w in weights.values())      # what is kept is usable


def test_unknown_option_and_command_are_one_line_errors():
    _one_line_error(run_cli("pretrain", "--bogus"), "--bogus")
    _one_line_error(run_cli("frobnicate"), "frobnicate")
    _one_line_error(run_cli("generate", "-c", ".", "-n", "many", "--prompt", "x"), "--max-new-tokens")


def test_gradient_accumulation_averages_micro_batches(tmp_path, shard_dir):
    """Two micro-batches of B rows give the gradient of one batch of 2B rows (the same windows)."""
    from llamac.data.loader import TokenLoader
    from llamac.data.pipeline import prepare_data
    recipe = debug_recipe(tmp_path, shard_dir, "train.grad_accum=2")
    info = prepare_data(recipe, verbose=False)
    loader = TokenLoader(info.train_path, recipe.data.seq_len, recipe.train.batch_size, recipe.seed)
    halves = [loader.get_batch(0, micro) for micro in (0, 1)]
    model = build_model(recipe, info.vocab_size, "cpu").to(dtype="float64")
    trainer = Trainer(recipe, model, "cpu", lambda step, micro: (*halves[micro], None), lambda m: {})
    trainer.optimizer.step = lambda lr=None, clip=None: 0.0      # keep the gradients, skip the update
    trainer.train_step()
    accumulated = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    x = np.concatenate([h[0] for h in halves])
    y = np.concatenate([h[1] for h in halves])
    model(x, y)[1].backward()
    for name, p in model.named_parameters():
        assert np.allclose(accumulated[name], p.grad, rtol=1e-9, atol=1e-12), name


def test_recompute_trains_to_the_same_losses(tmp_path, shard_dir):
    losses = {}
    for flag in ("false", "true"):
        recipe = debug_recipe(tmp_path / flag, shard_dir, "train.max_steps=6", "train.log_every=1", "train.eval_every=0",
                              "train.ckpt_every=0", "train.sample_tokens=0", f"train.recompute={flag}")
        pretrain(recipe, resume=False)
        lines = (Path(recipe.out_dir) / "metrics.jsonl").read_text().splitlines()
        losses[flag] = [json.loads(ln)["loss"] for ln in lines if '"loss"' in ln]
    assert len(losses["true"]) == 6 and losses["true"] == losses["false"]
