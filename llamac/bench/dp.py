"""`llamac bench --what dp`: data-parallel scaling. A training step's time on 1 rank and on N
(weak scaling: every rank trains the shape's batch, so N ranks train N times the tokens of a
step), the scaling efficiency (tokens/s per rank against one rank's), and each rank's optimizer
state with train.zero 0 and 1.

The ranks are started as `--gpus N` / `--procs N` start them (llamac.dist.launch), each running
this module: the model at the shape (bf16 on the GPU), synthetic tokens of its own, TrainStep
with the gradient reduction (the whole step as a CUDA graph on the GPU), timed after a warm-up.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llamac.engine import backend
from llamac.errors import LlamacError

DP_SHAPES = {
    "cpu": {"tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=None, vocab_size=4096,
                         seq_len=128, batch_size=8)},
    "cuda": {   # the shapes: bench.run's 350M, and Llama 3.2 1B's layout at head size 64 (bench.lora)
        "350M": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, hidden_dim=2816, vocab_size=32000,
                     seq_len=2048, batch_size=16),
        "1B-hs64": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        seq_len=2048, batch_size=8),
    },
}


def optimizer_state_bytes(opt) -> int:
    """This rank's AdamW moments and fp32 masters (ZeRO-1: its slices of them)."""
    inner = getattr(opt, "inner", opt)
    return int(sum(a.nbytes for d in (inner.m, inner.v, inner.master) for a in d.values()))


def rank_counts(device: str) -> list[int]:
    most = backend.gpu_count() if device == "cuda" else 2
    return sorted({n for n in (1, 2, 4, 8, most) if n <= most})


def bench_dp(device: str, shapes: dict | None = None, counts: list[int] | None = None, zeros=(0, 1),
             steps: int = 10, warmup: int = 3) -> list[dict]:
    shapes = shapes or DP_SHAPES[device]
    counts = counts or rank_counts(device)
    rows = []
    for name, shape in shapes.items():
        base = None
        for zero in zeros:
            for n in counts:
                if n == 1 and zero:       # one rank: ZeRO-1 shards over nothing
                    continue
                r = _run(device, n, name, shape, zero, steps, warmup)
                if n == 1:
                    base = r
                row = {"section": "dp", "shape": name, "device": device, "impl": f"{n} rank{'s' * (n > 1)}"
                       + (" zero1" if zero else ""), "ranks": n, "zero": zero, **{k: shape[k] for k in shape},
                       **r}
                if base is not None:
                    row["scaling_efficiency"] = round(r["tokens_per_s"] / n / base["tokens_per_s"], 3)
                    row["state_vs_one_rank"] = round(r["optimizer_state_MB"] / base["optimizer_state_MB"], 3)
                rows.append(row)
    return rows


def _run(device: str, n: int, name: str, shape: dict, zero: int, steps: int, warmup: int) -> dict:
    from llamac.dist.launch import start_ranks
    with tempfile.TemporaryDirectory(prefix="llamac-bench-dp-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "llamac.bench.dp", json.dumps({"name": name, "shape": shape, "device": device,
                "zero": zero, "steps": steps, "warmup": warmup, "out": str(out)})]
        code = start_ranks(argv, "gpus" if device == "cuda" else "procs", n, Path(tmp) / "ranks")
        if code != 0 or not out.is_file():
            raise LlamacError(f"bench --what dp: {n} ranks at {name} (zero {zero}) failed (exit code {code})")
        return json.loads(out.read_text())


def rank_main(spec: dict):
    """One rank of a measurement: writes rank 0's numbers to spec['out']."""
    import llamac
    from llamac.config import ModelConfig
    from llamac.dist import world
    from llamac.dist.reducer import GradReducer
    from llamac.dist.zero import ShardedAdamW
    from llamac.model.llama import Llama
    from llamac.train import fusions
    from llamac.train.optim import AdamW
    from llamac.train.step import TrainStep

    device, s = spec["device"], spec["shape"]
    group = world.init(device)
    with world.failures_end_the_job(group):
        B, T, V = s["batch_size"], s["seq_len"], s["vocab_size"]
        cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                          hidden_dim=s["hidden_dim"], vocab_size=V, max_seq_len=T)
        llamac.manual_seed(0)
        model = fusions.fuse(Llama(cfg).to(device, dtype="bfloat16" if device == "cuda" else None))
        params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        reducer = None
        if spec["zero"] and group.distributed:
            opt = ShardedAdamW(params, group, lr=1e-4, weight_decay=0.1)
            reducer = opt.reducer
        else:
            opt = AdamW(params, lr=1e-4, weight_decay=0.1)
            reducer = GradReducer([p for _, p in params], group) if group.distributed else None
        runner = TrainStep(model, opt, grad_clip=1.0, cuda_graph=True, reducer=reducer)
        rng = np.random.default_rng(group.rank)
        xp = backend.xp_for(device)
        batch = (xp.asarray(rng.integers(0, V, (B, T))), xp.asarray(rng.integers(0, V, (B, T))), None)
        for _ in range(spec["warmup"]):
            runner(lambda micro: batch, 1e-4)
        backend.synchronize()
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            loss, _ = runner(lambda micro: batch, 1e-4)
        float(loss)
        backend.synchronize()
        seconds = (time.perf_counter() - t0) / spec["steps"]
        slowest = float(group.sum_host([seconds])[0]) / group.world_size if group.distributed else seconds
        if group.is_main:
            result = {"step_ms": round(slowest * 1e3, 2), "tokens_per_s": round(group.world_size * B * T / slowest, 1),
                      "optimizer_state_MB": round(optimizer_state_bytes(opt) / 2**20, 3),
                      "cuda_graph": runner.captured, "params_M": round(model.num_params() / 1e6, 2)}
            if device == "cuda":
                result["gpu_pool_GB"] = round(backend.gpu_pools_bytes(runner.pool) / 1e9, 2)
            Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    rank_main(json.loads(sys.argv[1]))
