"""`llamac bench`: engine overhead, tokenizer speed, kernels, CPU training against PyTorch, eval scoring.

Each section returns plain dicts; the command prints them as tables and `--json` writes them all.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from llamac.bench.cpu_products import bench_cpu_products
from llamac.bench.timing import error_row
from llamac.engine import backend, onednn
from llamac.errors import LlamacError
from llamac.train import fusions


def _timeit(fn, sync=lambda: None, reps=5, warmup=2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- engine overhead

def bench_engine(device: str, n_ops: int = 2000) -> list[dict]:
    """Microseconds per op dispatch: a tiny add, raw xp vs llamac (recording a graph or not)."""
    import llamac
    xp = backend.xp_for(device)
    sync = backend.synchronize if device == "cuda" else (lambda: None)
    a_raw, b_raw = xp.ones(16, np.float32), xp.ones(16, np.float32)
    a, b = llamac.Tensor(a_raw), llamac.Tensor(b_raw)
    ag = llamac.Tensor(a_raw, requires_grad=True)

    def raw():
        for _ in range(n_ops):
            a_raw + b_raw

    def no_grad_ops():
        for _ in range(n_ops):
            a + b

    def recording():
        for _ in range(n_ops):
            ag + b

    def forward_backward():     # a chain of n/2 ops and its backward: n ops in all
        x = ag
        for _ in range(n_ops // 2):
            x = x * 1.0001
        x.backward(xp.ones(16, np.float32))
        ag.grad = None

    rows = []
    for name, fn in [("raw xp add", raw), ("llamac add (no graph)", no_grad_ops),
                     ("llamac add (recording)", recording), ("llamac forward+backward chain", forward_backward)]:
        seconds = _timeit(fn, sync)
        rows.append({"section": "engine", "device": device, "case": name, "us_per_op": round(seconds / n_ops * 1e6, 2)})
    return rows


# ---------------------------------------------------------------- CPU training vs PyTorch

TINY_SHAPE = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=None, vocab_size=4096, seq_len=128,
                  batch_size=16)    # recipes/pretrain/tiny.yaml
GPU_SHAPES = {  # DEVELOPERS.md / shared/anchors/torch_anchor.py CONFIGS
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000, seq_len=256,
                batch_size=128),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000, seq_len=1024,
                 batch_size=32),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, hidden_dim=2816, vocab_size=32000, seq_len=2048,
                 batch_size=16),
}
PEAK_BF16 = 989e12      # H100 SXM dense bf16 (datasheet), the MFU denominator


def bench_train(device: str = "cpu", shape: dict | None = None, steps: int = 4, compare_torch: bool = True,
                name: str = "tiny", dtype: str = "fp32") -> list[dict]:
    """Full training steps (forward, backward, clip, AdamW) on synthetic tokens: llamac, then the same
    model in PyTorch eager (on the GPU bf16 autocast, SDPA and fused AdamW; on the CPU fp32, and
    with dtype bf16 also CPU bf16 autocast, which the llamac row's vs_torch is then against).
    dtype bf16 on the CPU: llamac's matrix products in bf16 (llamac.engine.onednn)."""
    import llamac
    from llamac.config import ModelConfig, TrainConfig
    from llamac.model.llama import Llama
    from llamac.train.optim import AdamW

    s = {**TINY_SHAPE, **(shape or {})}
    B, T, V = s["batch_size"], s["seq_len"], s["vocab_size"]
    cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                      hidden_dim=s["hidden_dim"], vocab_size=V, max_seq_len=T)
    xp = backend.xp_for(device)
    sync = backend.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    x_np, y_np = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    x, y = xp.asarray(x_np), xp.asarray(y_np)
    llamac.manual_seed(0)
    gpu_bf16 = dtype == "bf16" and device == "cuda"
    model = fusions.fuse(Llama(cfg).to(device, dtype="bfloat16" if gpu_bf16 else None))
    opt = AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.1)
    clip = TrainConfig().grad_clip

    from llamac.train.loop import TrainStep
    runner = TrainStep(model, opt, grad_clip=clip, cuda_graph=False, cpu_bf16=dtype == "bf16" and device == "cpu")

    def step():
        runner(lambda micro: (x, y, None), 1e-4)

    ours = _timeit(step, sync, reps=steps)
    flops = model.flops_per_token(T)
    row = {"section": "train", "shape": name, "device": device, "impl": f"llamac ({dtype})", **s,
           "params_M": round(model.num_params() / 1e6, 2), "step_ms": round(ours * 1e3, 1),
           "tokens_per_s": round(B * T / ours, 1), "TFLOP_s": round(flops * B * T / ours / 1e12, 3)}
    if device == "cuda":
        row["gpu_pool_GB"] = round(backend.gpu_pool_bytes() / 1e9, 2)
    rows = [row]
    model = opt = x = y = runner = None  # noqa: F841 - free the GPU before PyTorch runs
    backend.release_gpu_memory()
    if compare_torch:
        try:
            import torch
        except ImportError:
            return rows
        from llamac.bench.torch_reference import build_torch_llama
        torch.manual_seed(0)
        dev = "cuda" if device == "cuda" else "cpu"
        tm = build_torch_llama(cfg).to(dev)
        topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.1, fused=dev == "cuda")
        tx, ty = torch.from_numpy(x_np).to(dev), torch.from_numpy(y_np).to(dev)
        # the GPU: bf16 autocast; the CPU: fp32, and CPU bf16 autocast beside a bf16 llamac row
        autocasts = [True] if dev == "cuda" else ([True, False] if dtype == "bf16" else [False])
        for autocast in autocasts:
            def tstep():
                topt.zero_grad(set_to_none=True)
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                    loss = tm(tx, ty)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(tm.parameters(), clip)
                topt.step()

            tsync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            theirs = _timeit(tstep, tsync, reps=steps)
            trow = {"section": "train", "shape": name, "device": device,
                    "impl": f"torch {torch.__version__} eager" + (" bf16 autocast" if autocast else " fp32") +
                            ("" if dev == "cuda" else f" ({torch.get_num_threads()} threads)"),
                    **s, "step_ms": round(theirs * 1e3, 1), "tokens_per_s": round(B * T / theirs, 1),
                    "TFLOP_s": round(flops * B * T / theirs / 1e12, 3)}
            if dev == "cuda":
                trow["gpu_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            rows.append(trow)
            rows[0]["vs_torch" if autocast == (dtype == "bf16" or dev == "cuda") else "vs_torch_fp32"] = \
                round(theirs / ours, 3)
    return rows


# ---------------------------------------------------------------- GPU training vs PyTorch

def bench_train_gpu(name: str, shape: dict, steps: int = 10, torch_modes=("eager", "compile"),
                    cuda_graph: bool = True, warmup: int = 4, device: str = "cuda",
                    optimizer_in_graph: bool = True, recompute: bool = False) -> list[dict]:
    """bf16 training steps on the GPU (forward, backward, clip 1.0, AdamW with fp32 masters) on
    synthetic tokens: llamac (TrainStep: CUDA graph after 2 eager steps), then the same model in
    PyTorch (bf16 autocast, SDPA, fused AdamW) eager and/or torch.compile, in this process (PyTorch
    first; rows: llamac, then each PyTorch mode).
    Timed over `steps` back-to-back steps after `warmup`; memory is llamac's CuPy pools (default +
    graph pools, blocks in use and cached) and torch.cuda.max_memory_allocated. device="cpu" runs
    the same code on a tiny shape (tests), without graphs, autocast or fused AdamW.
    recompute: llamac recomputes each layer's activations in the backward (train.recompute)."""
    import gc

    import llamac
    from llamac.config import ModelConfig
    from llamac.model.llama import Llama
    from llamac.train.loop import TrainStep
    from llamac.train.optim import AdamW

    s = dict(shape)
    B, T, V = s["batch_size"], s["seq_len"], s["vocab_size"]
    cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                      hidden_dim=s["hidden_dim"], vocab_size=V, max_seq_len=T)
    rng = np.random.default_rng(0)
    x_np, y_np = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    gpu = device == "cuda"
    sync = backend.synchronize if gpu else (lambda: None)
    base = {"section": "train", "shape": name, "device": device, **s}
    n_params = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim + cfg.n_layers * (
        2 * cfg.dim + cfg.dim * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.kv_heads) + 3 * cfg.dim * cfg.ffn_hidden)
    n_params -= 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim      # the lookup is no matmul
    model_flops = 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * T    # Llama.flops_per_token
    rows = []
    # PyTorch first, its cache emptied after: llamac's pools never crowd it out (and vice versa).
    try:
        import torch
    except ImportError:
        torch_modes = ()
    from llamac.bench.torch_reference import build_torch_llama
    for mode in torch_modes:
        trow = {**base, "mode": mode,
                "impl": f"torch {torch.__version__} {mode}" + (" (bf16 autocast, SDPA, fused AdamW)" if gpu else "")}
        try:
            torch.manual_seed(0)
            tm = build_torch_llama(cfg).to(device)
            topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.1, fused=gpu)
            if mode == "compile":
                # A fresh compile per shape: dynamo's cache outlives the model, and after a shape
                # change it may recompile with dynamic shapes (slower kernels than a user's static run).
                torch._dynamo.reset()
            fwd = torch.compile(tm) if mode == "compile" else tm
            tx, ty = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
            tsync = torch.cuda.synchronize if gpu else (lambda: None)

            def tstep():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
                    tloss = fwd(tx, ty)
                tloss.backward()
                torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
                topt.step()
                topt.zero_grad(set_to_none=True)
                return tloss

            for _ in range(3):
                tstep()
            tsync()
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                tloss = tstep()
            tsync()
            theirs = (time.perf_counter() - t0) / steps
            trow.update({"step_ms": round(theirs * 1e3, 2), "tokens_per_s": round(B * T / theirs),
                         "MFU": round(model_flops * B * T / theirs / PEAK_BF16, 4),
                         "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else None,
                         "peak_reserved_GB": round(torch.cuda.max_memory_reserved() / 1e9, 2) if gpu else None,
                         "loss": round(float(tloss.detach()), 4)})
        except Exception as exc:
            trow = error_row(trow, exc)
        rows.append(trow)
        tm = topt = fwd = tx = ty = None  # noqa: F841
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    backend.release_gpu_memory()
    row = {**base, "impl": (("llamac bf16" + (" + CUDA graph" if cuda_graph else " eager")) if gpu else "llamac fp32")
           + (" + recompute" if recompute else "")}
    seconds = runner = None
    try:
        xp = backend.xp_for(device)
        x, y = xp.asarray(x_np), xp.asarray(y_np)
        llamac.manual_seed(0)
        model = fusions.fuse(Llama(cfg).to(device, dtype="bfloat16" if gpu else None), recompute=recompute)
        flops = model.flops_per_token(T)
        row["params_M"] = round(model.num_params() / 1e6, 2)
        opt = AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.1)
        runner = TrainStep(model, opt, grad_clip=1.0, cuda_graph=cuda_graph, optimizer_in_graph=optimizer_in_graph)
        peak = 0
        for _ in range(warmup):
            loss, _ = runner(lambda micro: (x, y, None), 1e-4)
            peak = max(peak, backend.gpu_pools_bytes(runner.pool))
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = runner(lambda micro: (x, y, None), 1e-4)
        sync()
        seconds = (time.perf_counter() - t0) / steps
        peak = max(peak, backend.gpu_pools_bytes(runner.pool))
        if runner.captured:     # the graph alone (with the optimizer when it is recorded in it)
            t0 = time.perf_counter()
            for _ in range(steps):
                runner._replay([(x, y, None)])
            sync()
            key = "graph_with_optimizer_ms" if runner.update is not None else "fwd_bwd_graph_ms"
            row[key] = round((time.perf_counter() - t0) / steps * 1e3, 2)
            if gpu and runner.pool is not None:     # the graph's pool: blocks in use vs held
                row["graph_pool_GB"] = round(runner.pool.total_bytes() / 1e9, 2)
                row["graph_pool_used_GB"] = round(runner.pool.used_bytes() / 1e9, 2)
        row.update({"step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(B * T / seconds),
                    "MFU": round(flops * B * T / seconds / PEAK_BF16, 4),
                    "peak_GB": round(peak / 1e9, 2) if gpu else None,
                    "MFU_peak": "989 TFLOP/s (H100 SXM dense bf16)",
                    "loss": round(float(loss), 4), "graph": runner.captured,
                    **({"graph_error": runner.graph_error} if runner.graph_error else {})})
    except Exception as exc:   # OOM at 350M without flash attention: a row, not a crash
        row = error_row(row, exc)
    rows.insert(0, row)
    if runner is not None:
        runner.release()
    model = opt = runner = x = y = loss = None   # noqa: F841
    gc.collect()
    backend.release_gpu_memory()
    for r in rows[1:]:      # PyTorch's step time over ours
        if seconds is not None and r.get("step_ms"):
            row[f"vs_torch_{r['mode']}"] = round(r["step_ms"] / 1e3 / seconds, 3)
    return rows


# ---------------------------------------------------------------- the command

def run_bench(what: str = "engine", compare: str | None = None, json_out: Path | None = None, device: str = "auto"):
    from rich.console import Console
    from rich.table import Table

    device = backend.resolve_device(device)
    sections = [w.strip() for w in what.split(",") if w.strip()]
    known = {"engine", "tokenizer", "train_cpu", "train", "kernels", "decode", "serve", "eval", "lora", "dp"}
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise LlamacError(f"unknown bench section {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    if compare not in (None, "none", "torch", "torch-compile"):
        raise LlamacError(f"unknown --compare {compare!r}; choose torch, torch-compile (train: torch.compile "
                          "only, no eager PyTorch) or none")
    results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device,
                        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "numpy": np.__version__}}
    for section in sections:
        if section == "engine":
            rows = bench_engine("cpu") + (bench_engine("cuda") if device == "cuda" else [])
        elif section == "tokenizer":
            from llamac.data.pipeline import measure_encoding_speed
            rows = [{"section": "tokenizer", **measure_encoding_speed(None)}]
        elif section == "train_cpu":
            with_torch = compare in ("torch", "torch-compile") or compare is None
            # oneDNN loads before PyTorch, as in a llamac run: its OpenMP runtime (which PyTorch then
            # shares) starts with threads that sleep between products. Loaded after PyTorch's, it
            # would inherit spinning threads that take a core from the NumPy row blocks (bf16 steps
            # 2-3x slower); PyTorch timed as fast or faster with sleeping threads on 2 shared cores.
            bf16 = onednn.available()
            rows = bench_train("cpu", compare_torch=with_torch)
            if bf16:
                rows += bench_train("cpu", compare_torch=with_torch, dtype="bf16")
                rows += bench_cpu_products(compare_torch=with_torch)
        elif section == "train":
            if device != "cuda":
                raise LlamacError("bench --what train runs the GPU shapes (--device cuda); use train_cpu on the CPU")
            rows = []
            modes = {"torch": ("eager", "compile"), "torch-compile": ("compile",)}.get(compare, ())
            for name, shape in GPU_SHAPES.items():
                rows += bench_train_gpu(name, shape, torch_modes=modes)
        elif section == "kernels":
            if device != "cuda":
                raise LlamacError("bench --what kernels needs a CUDA GPU (--device cuda)")
            from llamac.bench.kernels import bench_swiglu, bench_training_kernels, measure_copy_bandwidth
            rows = [{"section": "kernels", "op": "device copy", "gb_per_s": round(measure_copy_bandwidth(), 1)}]
            rows += [{"section": "kernels", **r} for r in bench_swiglu()]
            rows += [{"section": "kernels", **r} for r in bench_training_kernels()]
            from llamac.bench.kernels import bench_attention_kernels
            rows += [{"section": "kernels", **r} for r in bench_attention_kernels(torch_compare=compare in ("torch", "torch-compile"))]
        elif section == "lora":
            if device != "cuda":
                raise LlamacError("bench --what lora measures GPU memory and step time (--device cuda)")
            from llamac.bench.lora import LORA_SHAPES, bench_lora
            rows = [r for name, shape in LORA_SHAPES.items() for r in bench_lora(name, shape)]
        elif section == "decode":
            if device != "cuda":
                raise LlamacError("bench --what decode needs a CUDA GPU (--device cuda)")
            from llamac.bench.decode import bench_decode
            rows = bench_decode(compare=compare != "none")
        elif section == "serve":      # the GPU shapes on CUDA; on any device, the host's cost per token
            from llamac.bench.serve import bench_serve
            from llamac.bench.serve_host import bench_serve_host
            from llamac.serve import require_web_stack
            require_web_stack()
            rows = (bench_serve() if device == "cuda" else []) + bench_serve_host()
        elif section == "dp":
            from llamac.bench.dp import bench_dp
            rows = bench_dp(device)
        elif section == "eval":
            from llamac.bench.eval import bench_eval
            gpu = device == "cuda"
            rows = bench_eval("110M" if gpu else "tiny", n_items=10000 if gpu else 200, device=device,
                              dtype="bf16" if gpu else "fp32", compare_torch=compare != "none")
        results[section] = rows
        _print_table(Console(), Table, section, rows)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(results, indent=1, default=str))
    return results


# The printed table: what a row measures, what ran, its headline figure (a server's p50 / p99 latencies
# beneath it) and its ratio to the reference, so that it reads at 80 columns; every other field is in --json.
HEADLINES = (("decode_tok_s", "tok/s"), ("step_ms", "ms/step"), ("tflops", "TFLOP/s"), ("ms", "ms"),
             ("us_per_op", "us/op"), ("mb_per_s", "MB/s"), ("gb_per_s", "GB/s"), ("tokens_per_s", "tok/s"))
RATIOS = ("vs_torch_compile", "vs_torch_graph", "vs_torch_eager", "vs_torch", "of_onednn", "torch_over_ours", "vs_hf",
          "vs_batch1", "vs_one_client", "vs_generate", "vs_alone", "vs_device", "peak_vs_full", "scaling_efficiency")


def summary_row(row: dict) -> tuple[str, str, str, str]:
    """(what, implementation, headline figure with its unit, ratio to the reference) of one bench row."""
    what = " ".join(str(row[k]) for k in ("shape", "case", "op", "kernel") if row.get(k) not in (None, ""))
    if row.get("batch") is not None:
        what += f" b{row['batch']}"
    impl = str(row.get("impl") or row.get("mode") or row.get("dtype") or row.get("device") or "")
    headline = next(((k, unit) for k, unit in HEADLINES if row.get(k) is not None), None)
    figure = "" if headline is None else f"{_fmt(row[headline[0]])} {headline[1]}"
    if str(row.get("status", "")).startswith(("OOM", "error")):
        figure = str(row["status"])[:40]
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):      # a server's latencies, under its tok/s
        if row.get(f"{key}_p50") is not None:
            figure += f"\n{label} {row[f'{key}_p50']:.3g}/{row[f'{key}_p99']:.3g} ms"
    ratio = next((f"{_fmt(row[k])}x {k}" for k in RATIOS if isinstance(row.get(k), (int, float))), "")
    return what or row.get("section", ""), impl, figure, ratio


def _print_table(console, Table, title, rows):
    if not rows:
        return
    latencies = any(r.get("ttft_ms_p50") is not None for r in rows)
    table = Table(title=f"{title}  ({'latencies p50/p99; ' * latencies}every field: --json FILE)")
    for c in ("what", "impl", "figure", "ratio"):
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*summary_row(r))
    console.print(table)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- where the GPU time goes

def profile_train_gpu(name: str, shape: dict, top: int = 30) -> list[dict]:
    """GPU time per kernel over one eager llamac bf16 training step (the same kernels a graph
    replays), through torch.profiler's CUPTI trace, which records every kernel in the process
    (cuBLAS, CuPy, llamac's). Rows: kernel, calls, total ms, share of the step; largest first."""
    from torch.profiler import ProfilerActivity, profile

    import llamac
    from llamac.config import ModelConfig
    from llamac.model.llama import Llama
    from llamac.train.loop import TrainStep
    from llamac.train.optim import AdamW

    s = dict(shape)
    B, T, V = s["batch_size"], s["seq_len"], s["vocab_size"]
    cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                      hidden_dim=s["hidden_dim"], vocab_size=V, max_seq_len=T)
    xp = backend.xp_for("cuda")
    rng = np.random.default_rng(0)
    x, y = xp.asarray(rng.integers(0, V, (B, T))), xp.asarray(rng.integers(0, V, (B, T)))
    llamac.manual_seed(0)
    model = Llama(cfg).to("cuda", dtype="bfloat16")
    runner = TrainStep(model, AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.1), grad_clip=1.0,
                       cuda_graph=False)
    for _ in range(2):
        runner(lambda micro: (x, y, None), 1e-4)
    backend.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner(lambda micro: (x, y, None), 1e-4)
        backend.synchronize()
    totals: dict = {}
    for evt in prof.events():
        if "CUDA" not in str(getattr(evt, "device_type", "")):     # CPU-side records: not GPU time
            continue
        us = evt.time_range.elapsed_us()
        key = evt.name[:90]
        calls, t = totals.get(key, (0, 0.0))
        totals[key] = (calls + 1, t + us)
    step_us = sum(t for _, t in totals.values()) or 1.0
    rows = [{"section": "profile", "shape": name, "kernel": k, "calls": c, "ms": round(t / 1e3, 3),
             "share": round(t / step_us, 4)} for k, (c, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])]
    rows.insert(0, {"section": "profile", "shape": name, "kernel": "(all kernels, one eager step)",
                    "calls": sum(c for c, _ in totals.values()), "ms": round(step_us / 1e3, 3), "share": 1.0})
    runner.release()
    model = runner = None  # noqa: F841
    backend.release_gpu_memory()
    return rows[: top + 1]
