"""`llamac bench --what lora`: full SFT against LoRA at one shape and batch, peak memory and step time.

Both runs are llamac's GPU training step as `llamac sft` runs it (bf16 compute, AdamW with fp32 masters,
clip 1.0, the step as a CUDA graph after the eager warm-up), on the same synthetic tokens and the same
model: first every weight trains, then the same model is frozen and given rank-16 adapters on every
attention and MLP projection and the chat tokens' embedding rows (sft.lora's defaults). Peak memory is what CuPy's pools hold (the default pool and
the graph's, blocks in use and cached), sampled after every step, the way `bench --what train` reports it.
"""
from __future__ import annotations

import gc
import time

import numpy as np

from llamac.bench.timing import error_row
from llamac.engine import backend

LORA_SHAPES = {   # Llama 3.2 1B's layout at head size 64
    "1B-hs64": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                    seq_len=2048, batch_size=8),
}


def _steps(runner, batch, warmup: int, steps: int, sync):
    """(seconds per step over `steps` after `warmup`, peak pool bytes, last loss)."""
    peak = 0
    for _ in range(warmup):
        loss, _ = runner(lambda micro: batch, 1e-4)
        peak = max(peak, backend.gpu_pools_bytes(runner.pool))
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = runner(lambda micro: batch, 1e-4)
        peak = max(peak, backend.gpu_pools_bytes(runner.pool))
    sync()
    return (time.perf_counter() - t0) / steps, max(peak, backend.gpu_pools_bytes(runner.pool)), float(loss)


def bench_lora(name: str, shape: dict, rank: int = 16, steps: int = 10, warmup: int = 4, device: str = "cuda",
               cuda_graph: bool = True) -> list[dict]:
    """Rows: full SFT, then LoRA (rank `rank`, all seven projections), each with step_ms and peak_GB;
    the LoRA row also has peak_vs_full and step_vs_full. device="cpu" runs the same code (fp32, no
    graphs, no memory figures) for the tests."""
    import llamac
    from llamac.config import LORA_TARGETS, LoRAConfig, ModelConfig
    from llamac.data.tokenizer import SPECIAL_TOKENS
    from llamac.infer.chat import TEMPLATE_TOKENS
    from llamac.model.llama import Llama
    from llamac.train import fusions, lora
    from llamac.train.checkpoint import trainable_parameters
    from llamac.train.loop import TrainStep
    from llamac.train.optim import AdamW

    s = dict(shape)
    B, T, V = s["batch_size"], s["seq_len"], s["vocab_size"]
    cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                      hidden_dim=s["hidden_dim"], vocab_size=V, max_seq_len=T)
    gpu = device == "cuda"
    sync = backend.synchronize if gpu else (lambda: None)
    rng = np.random.default_rng(0)
    xp = backend.xp_for(device)
    batch = (xp.asarray(rng.integers(0, V, (B, T))), xp.asarray(rng.integers(0, V, (B, T))), None)
    llamac.manual_seed(0)
    model = fusions.fuse(Llama(cfg).to(device, dtype="bfloat16" if gpu else None))
    rows = []
    for mode in ("full", "lora"):
        if mode == "lora":
            # llamac's tokenizer has its reserved tokens at ids 3, 4, ... (llamac.data.tokenizer)
            chat_ids = [3 + SPECIAL_TOKENS.index(t) for t in TEMPLATE_TOKENS]
            lora.apply_lora(model, LoRAConfig(rank=rank, targets=list(LORA_TARGETS)), chat_ids)
        trainable = trainable_parameters(model)
        runner = TrainStep(model, AdamW(trainable, lr=1e-4, weight_decay=0.0), grad_clip=1.0, cuda_graph=cuda_graph)
        row = {"section": "lora", "shape": name, "device": device, **s,
               "impl": f"llamac {'full SFT' if mode == 'full' else f'LoRA r{rank}'}"
                       + (" bf16" + (" + CUDA graph" if cuda_graph else "") if gpu else " fp32"),
               "trainable_M": round(sum(p.size for _, p in trainable) / 1e6, 3)}
        try:
            seconds, peak, loss = _steps(runner, batch, warmup, steps, sync)
            row.update({"step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(B * T / seconds),
                        "peak_GB": round(peak / 1e9, 2) if gpu else None, "loss": round(loss, 4),
                        "graph": runner.captured})
        except Exception as exc:       # an OOM at this shape: a row, not a crash
            row = error_row(row, exc)
        runner.release()
        runner = None
        gc.collect()
        backend.release_gpu_memory()
        rows.append(row)
    full, adapted = rows
    if full.get("step_ms") and adapted.get("step_ms"):
        adapted["step_vs_full"] = round(adapted["step_ms"] / full["step_ms"], 3)
        if gpu:
            adapted["peak_vs_full"] = round(adapted["peak_GB"] / full["peak_GB"], 3)
    return rows
