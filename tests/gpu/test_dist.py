"""Data parallel on GPUs: NCCL with one rank is the non-distributed step (the reduction inside the
CUDA graph), ZeRO-1 with one rank follows it, and, where the machine has several GPUs, N ranks
train the one-GPU curve. Each run is its own process: a process joins one data-parallel group."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamac.engine import backend

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "recipes" / "pretrain" / "debug.yaml"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAMAC_DIST_RUN_DIR")


def _common(tmp_path, steps=10, extra=()):
    # the repository's own sources as text (present everywhere); bf16, the CUDA graph on
    return ["--device", "cuda", "--set", f"data.sources=[{ROOT / 'llamac'}]", "--set", "data.glob=**/*.py",
            "--set", f"data.shard_dir={tmp_path / 'data'}", "--set", f"train.max_steps={steps}",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.sample_tokens=0",
            "--set", "train.ckpt_every=0", "--set", "train.dtype=bf16", "--set", "train.cuda_graph=true", *extra]


def _run(out: Path, args, env_extra=None):
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    # cuBLAS's first algorithm for every GEMM: timing the candidates could pick others in another run
    environ.update(PYTHONPATH=str(ROOT), LLAMAC_GEMM_AUTOTUNE="0", **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "llamac", "pretrain", str(DEBUG), "--set", f"out_dir={out}", *args],
                          capture_output=True, text=True, timeout=900, env=environ, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CUDA graph capture failed" not in done.stderr, done.stderr[-3000:]
    return done


def _losses(out: Path) -> dict:
    rs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rs if "loss" in r}


def _torchrun_env(rank=0, world=1):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


@pytest.mark.parametrize("grad_accum", [1, 2])      # 2: the last micro-batch's own graph reduces
def test_nccl_with_one_rank_is_the_one_gpu_step(tmp_path, grad_accum):
    args = _common(tmp_path, extra=["--set", f"train.grad_accum={grad_accum}"])
    _run(tmp_path / "plain", args)
    _run(tmp_path / "plain_again", args)
    done = _run(tmp_path / "nccl", ["--gpus", "1", *args])          # the launcher: RANK=0, WORLD_SIZE=1
    assert "1 rank (nccl)" in done.stderr
    plain, again, nccl = _losses(tmp_path / "plain"), _losses(tmp_path / "plain_again"), _losses(tmp_path / "nccl")
    assert plain.keys() == nccl.keys() and max(plain) == 10
    if plain == again:
        # the one-GPU run repeats itself bit for bit: a one-rank NCCL group must change nothing
        assert nccl == plain
    else:   # the GPU's atomic adds (the embedding backward) vary from run to run: no closer than that
        spread = max(abs(plain[s] - again[s]) / plain[s] for s in plain)
        worst = max(abs(plain[s] - nccl[s]) / plain[s] for s in plain)
        print(f"run-to-run spread {spread:.2e}, NCCL one rank vs plain {worst:.2e}")
        assert worst <= max(4 * spread, 1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2])      # 1: the sharded AdamW inside the graph; 2: after it
def test_zero1_with_one_rank_follows_the_one_gpu_step(tmp_path, grad_accum):
    args = _common(tmp_path, extra=["--set", f"train.grad_accum={grad_accum}"])
    _run(tmp_path / "plain", args)
    _run(tmp_path / "zero1", [*args, "--set", "train.zero=1"], env_extra=_torchrun_env())     # torchrun's variables
    plain, zero = _losses(tmp_path / "plain"), _losses(tmp_path / "zero1")
    assert plain.keys() == zero.keys()
    worst = max(abs(plain[s] - zero[s]) / plain[s] for s in plain)
    print(f"ZeRO-1 one rank vs plain: max relative loss difference {worst:.2e}")
    assert worst <= 5e-3


@pytest.mark.skipif(backend.gpu_count() < 2, reason="needs 2 GPUs or more")
@pytest.mark.parametrize("zero", [0, 1])
def test_n_gpus_train_the_one_gpu_curve(tmp_path, zero):
    n = 1 << (min(backend.gpu_count(), 8).bit_length() - 1)       # 2, 4 or 8: they divide the batch of 16
    args = _common(tmp_path, steps=200, extra=["--set", "train.log_every=5", "--set", "train.batch_size=16"])
    _run(tmp_path / "one", args)
    _run(tmp_path / "many", ["--gpus", str(n), *args, "--set", f"train.zero={zero}"])
    one, many = _losses(tmp_path / "one"), _losses(tmp_path / "many")
    assert one.keys() == many.keys() and max(one) == 200
    worst = max(abs(one[s] - many[s]) / one[s] for s in one)
    print(f"{n} GPUs (zero {zero}) vs one: max relative loss difference over 200 steps {worst:.4f}")
    assert worst <= 0.02
    np.testing.assert_allclose(many[200], one[200], rtol=0.01)


def test_bench_dp_runs_on_the_gpu():
    from llamac.bench.dp import bench_dp
    shape = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000, seq_len=256,
                 batch_size=32)
    rows = bench_dp("cuda", shapes={"15M": shape}, steps=5, warmup=3)
    assert rows[0]["ranks"] == 1 and rows[0]["cuda_graph"] is True
    for r in rows:
        print(json.dumps(r))
        assert r["step_ms"] > 0 and 0 < r["scaling_efficiency"] <= 1.5
