"""loss.png: the training and validation loss curves of a run, and its train.eval_tasks numbers, from metrics.jsonl."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """Loss curve (train and validation) as a PNG; needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot (pip install 'llamac[plot]')", file=sys.stderr)
        return False
    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    tasks = task_series(records)
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(12 if tasks else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:
        ax = axes[0][1]
        for name, points in tasks.items():
            ax.plot(*zip(*points), "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("eval tasks (accuracy; bpb in bits per byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def task_series(records: list[dict]) -> dict:
    """{metric: [(step, value)]} of the train.eval_tasks numbers in evaluation records (every key
    beside the step, the losses and the perplexity)."""
    skip = {"step", "loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "grad_norm", "mfu"}
    series: dict = {}
    for r in records:
        if "loss" in r:
            continue
        for key, value in r.items():
            if key not in skip and isinstance(value, (int, float)):
                series.setdefault(key, []).append((r["step"], value))
    return series
