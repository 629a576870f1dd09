"""GPU timings of the hand-written kernels, as plain dicts (the caller prints the tables).

Memory-bound kernels are judged by bandwidth: bytes the op must read and write
over time, against a measured device-to-device copy on the same GPU (the
practical ceiling), and against PyTorch's eager version of the same op when
torch with CUDA is installed. Imports with no GPU; the functions raise
LlamacError when called without one.
"""
from __future__ import annotations

import numpy as np

from llamac.bench import flash as flash_bench
from llamac.bench.timing import _time_ms
from llamac.engine import backend, cublas
from llamac.errors import LlamacError
from llamac.ops import cross_entropy, embedding, flash_forward, rmsnorm, rope, swiglu

DEFAULT_SIZES = (1 << 16, 1 << 20, 1 << 24, 1 << 26)
# Bigger than H100's 50 MB L2, so the copy and a flush stream from DRAM.
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20


def _cupy(what: str):
    try:
        return backend.cupy_module()
    except LlamacError as exc:
        raise LlamacError(f"{what} needs a CUDA GPU with CuPy: {exc}") from None


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, reps: int = 20, warmup: int = 3) -> float:
    """GB/s (1e9 bytes/s) of a device-to-device cudaMemcpy, counting the bytes read plus written."""
    cp = _cupy("measure_copy_bandwidth")
    src = cp.ones(nbytes, dtype=np.uint8)
    dst = cp.empty_like(src)
    ms = _time_ms(lambda: dst.data.copy_from_device_async(src.data, nbytes), reps, warmup)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _rel_err(got, want) -> float:
    got, want = backend.to_numpy(got).astype(np.float64), backend.to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _torch_swiglu_timer(n: int, dtype: np.dtype, reps: int, warmup: int, between):
    """(forward ms, backward ms) of eager PyTorch silu(g) * u, or (None, None) without torch+CUDA."""
    try:
        import torch  # noqa: PLC0415 - optional comparison only
        import torch.nn.functional as F  # noqa: PLC0415
    except Exception:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    tdtype = {np.dtype(np.float32): torch.float32, backend.bfloat16: torch.bfloat16,
              np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
    g = torch.randn(n, device="cuda", dtype=tdtype, requires_grad=True)
    u = torch.randn(n, device="cuda", dtype=tdtype, requires_grad=True)
    d = torch.randn(n, device="cuda", dtype=tdtype)
    with torch.no_grad():
        fwd = _time_ms(lambda: F.silu(g) * u, reps, warmup, between)
    out = F.silu(g) * u  # one graph, kept, so each rep times the backward pass alone
    bwd = _time_ms(lambda: torch.autograd.grad(out, (g, u), d, retain_graph=True), reps, warmup, between)
    return fwd, bwd


def bench_swiglu(sizes=DEFAULT_SIZES, dtype="bfloat16", reps: int = 100, warmup: int = 10,
                 flush_l2: bool = True, torch_compare: bool = True) -> list[dict]:
    """Time swiglu.swiglu_forward/backward on the GPU; one dict per (size, direction).

    Keys: op, n, dtype, ms (median), gb_per_s (bytes read + written / ms),
    copy_gb_per_s, pct_of_copy, max_rel_err (vs the reference, on the GPU),
    torch_ms and torch_over_ours (> 1: ours is faster; None without torch+CUDA).
    flush_l2 overwrites a buffer larger than L2 before every rep, so small
    sizes are not timed from cache.
    """
    cp = _cupy("bench_swiglu")
    dtype = backend.as_dtype(dtype)
    if dtype not in backend.CUDA_TYPES:
        raise LlamacError(f"bench_swiglu: dtype must be float32, bfloat16 or float16, not {dtype}")
    copy_gbps = measure_copy_bandwidth()
    scratch = cp.empty(FLUSH_BYTES, dtype=np.uint8) if flush_l2 else None
    between = (lambda: scratch.fill(1)) if flush_l2 else None
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        n = int(n)
        gate, up, dout = (cp.asarray(rng.standard_normal(n, dtype=np.float32).astype(dtype)) for _ in range(3))
        out = cp.empty_like(gate)
        dgate, dup = cp.empty_like(gate), cp.empty_like(gate)

        swiglu.swiglu_forward(gate, up, out=out)
        fwd_err = _rel_err(out, swiglu.swiglu_forward_reference(gate, up))
        swiglu.swiglu_backward(gate, up, dout, dgate=dgate, dup=dup)
        ref_dgate, ref_dup = swiglu.swiglu_backward_reference(gate, up, dout)
        bwd_err = max(_rel_err(dgate, ref_dgate), _rel_err(dup, ref_dup))

        fwd_ms = _time_ms(lambda: swiglu.swiglu_forward(gate, up, out=out), reps, warmup, between)
        bwd_ms = _time_ms(lambda: swiglu.swiglu_backward(gate, up, dout, dgate=dgate, dup=dup),
                          reps, warmup, between)
        torch_fwd, torch_bwd = (_torch_swiglu_timer(n, dtype, reps, warmup, between)
                                if torch_compare else (None, None))

        # forward reads gate, up and writes out; backward reads gate, up, dout and writes dgate, dup
        for op, ms, tensors, err, torch_ms in (("forward", fwd_ms, 3, fwd_err, torch_fwd),
                                                ("backward", bwd_ms, 5, bwd_err, torch_bwd)):
            gbps = tensors * n * dtype.itemsize / (ms * 1e-3) / 1e9
            rows.append({
                "op": f"swiglu_{op}",
                "n": n,
                "dtype": str(dtype),
                "ms": ms,
                "gb_per_s": gbps,
                "copy_gb_per_s": copy_gbps,
                "pct_of_copy": 100.0 * gbps / copy_gbps,
                "max_rel_err": err,
                "torch_ms": torch_ms,
                "torch_over_ours": (torch_ms / ms) if torch_ms is not None else None,
            })
        del gate, up, dout, out, dgate, dup
    return rows


# ---------------------------------------------------------------- the training kernels
# One row per (kernel, direction) at a training step's shape; bytes are what the op must move.

# The 110M recipe: B*T = 32 x 1024 rows, dim 768, 12 heads of 64, vocab 32000, hidden 2048, 12 layers.
SHAPE_110M = {"rows": 32 * 1024, "batch": 32, "seq": 1024, "dim": 768, "heads": 12, "vocab": 32000,
              "hidden": 2048, "layers": 12}


def _torch(dtype):
    """(torch, torch dtype) when torch with CUDA imports, else (None, None)."""
    try:
        import torch  # noqa: PLC0415 - optional comparison only
    except Exception:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    return torch, {np.dtype(np.float32): torch.float32, backend.bfloat16: torch.bfloat16,
                   np.dtype(np.float16): torch.float16}[np.dtype(dtype)]


def _row(op, shape, dtype, ms, nbytes, copy_gbps, err, torch_ms, note=""):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"op": op, "shape": str(shape), "dtype": str(dtype), "ms": ms, "gb_per_s": gbps,
            "copy_gb_per_s": copy_gbps, "pct_of_copy": 100.0 * gbps / copy_gbps, "max_rel_err": err,
            "torch_ms": torch_ms, "torch_over_ours": (torch_ms / ms) if torch_ms else None, "note": note}


def _model_param_sizes(shape) -> list[tuple[str, tuple]]:
    """(name, shape) of every parameter of a Llama model of `shape` (untied output head)."""
    C, V, Hd, L = shape["dim"], shape["vocab"], shape["hidden"], shape["layers"]
    out = [("tok_embeddings.weight", (V, C))]
    for i in range(L):
        out += [(f"layers.{i}.attention.{w}.weight", (C, C)) for w in ("wq", "wk", "wv", "wo")]
        out += [(f"layers.{i}.feed_forward.w1.weight", (Hd, C)), (f"layers.{i}.feed_forward.w3.weight", (Hd, C)),
                (f"layers.{i}.feed_forward.w2.weight", (C, Hd)),
                (f"layers.{i}.attention_norm.weight", (C,)), (f"layers.{i}.ffn_norm.weight", (C,))]
    return out + [("norm.weight", (C,)), ("output.weight", (V, C))]


def bench_training_kernels(dtype="bfloat16", shape=None, reps: int = 20, warmup: int = 3,
                           flush_l2: bool = True, torch_compare: bool = True, only=None) -> list[dict]:
    """Time the fused training kernels (RMSNorm, RoPE, embedding backward, cross-entropy, AdamW) at a
    training step's shape (default: the 110M recipe) against the copy ceiling and eager PyTorch.

    Keys as bench_swiglu's, plus shape and note. `only`: a set of op-name prefixes to run.
    """
    cp = _cupy("bench_training_kernels")
    from llamac.engine.tensor import Tensor  # noqa: PLC0415
    from llamac.train.optim import AdamW, decays  # noqa: PLC0415

    dtype = backend.as_dtype(dtype)
    shape = dict(SHAPE_110M, **(shape or {}))
    N, C, V, H = shape["rows"], shape["dim"], shape["vocab"], shape["heads"]
    B, T, hs = shape["batch"], shape["seq"], shape["dim"] // shape["heads"]
    isz = dtype.itemsize
    copy_gbps = measure_copy_bandwidth()
    scratch = cp.empty(FLUSH_BYTES, dtype=np.uint8) if flush_l2 else None
    between = (lambda: scratch.fill(1)) if flush_l2 else None
    torch, tdt = _torch(dtype) if torch_compare else (None, None)
    rng = cp.random.default_rng(0)
    rows = []

    def want(name):
        return only is None or any(name.startswith(o) for o in only)

    def randn(*s, std=1.0):
        return (rng.standard_normal(s, dtype=np.float32) * std).astype(dtype)

    def t_of(a, grad=False):
        # bf16 crosses as its bits: __cuda_array_interface__ has no bfloat16 type string
        t = (torch.as_tensor(a.view(np.uint16), device="cuda").view(torch.bfloat16) if a.dtype == backend.bfloat16
             else torch.as_tensor(a, device="cuda"))
        return t.detach().requires_grad_(grad)

    def timed(fn):
        return _time_ms(fn, reps, warmup, between)

    if want("rmsnorm"):
        x, w, d = randn(N, C), (1 + 0.1 * randn(C).astype(np.float32)).astype(dtype), randn(N, C)
        y, rstd = rmsnorm.rmsnorm_forward(x, w)
        err = _rel_err(y, rmsnorm.rmsnorm_forward_reference(x, w)[0])
        dx, dw = rmsnorm.rmsnorm_backward(d, x, w, rstd)
        rdx, rdw = rmsnorm.rmsnorm_backward_reference(d, x, w, rstd)
        berr = max(_rel_err(dx, rdx), _rel_err(dw, rdw))
        fwd, bwd = timed(lambda: rmsnorm.rmsnorm_forward(x, w)), timed(lambda: rmsnorm.rmsnorm_backward(d, x, w, rstd))
        tf = tb = None
        if torch is not None and hasattr(torch.nn.functional, "rms_norm"):
            tx, tw, td = t_of(x, True), t_of(w, True), t_of(d)
            with torch.no_grad():
                tf = timed(lambda: torch.nn.functional.rms_norm(tx, (C,), tw, 1e-5))
            ty = torch.nn.functional.rms_norm(tx, (C,), tw, 1e-5)
            tb = timed(lambda: torch.autograd.grad(ty, (tx, tw), td, retain_graph=True))
        rows.append(_row("rmsnorm_forward", (N, C), dtype, fwd, 2 * N * C * isz + 4 * N, copy_gbps, err, tf))
        rows.append(_row("rmsnorm_backward", (N, C), dtype, bwd, 3 * N * C * isz + 4 * N, copy_gbps, berr, tb,
                         "dx + deterministic fp32 dw"))
        del x, d, y, dx

    if want("rope"):
        x = randn(B, T, H, hs)
        ang = cp.arange(T, dtype=np.float32)[:, None] * (1.0 / 10000 ** (cp.arange(0, hs, 2, dtype=np.float32) / hs))
        cos, sin = cp.cos(ang).astype(np.float32), cp.sin(ang).astype(np.float32)
        out = rope.rope_forward(x, cos, sin)
        err = _rel_err(out, rope.rope_reference(x, cos, sin))
        berr = _rel_err(rope.rope_backward(out, cos, sin), rope.rope_reference(out, cos, sin, -1.0))
        fwd, bwd = timed(lambda: rope.rope_forward(x, cos, sin)), timed(lambda: rope.rope_backward(x, cos, sin))
        tf = tb = None
        if torch is not None:
            freqs = torch.polar(torch.ones_like(t_of(cos)), t_of(ang))[None, :, None, :]
            tx, td = t_of(x, True), t_of(randn(B, T, H, hs))

            def meta_rope(a):  # Meta's llama apply_rotary_emb
                z = torch.view_as_complex(a.float().reshape(*a.shape[:-1], -1, 2))
                return torch.view_as_real(z * freqs).flatten(3).type_as(a)
            with torch.no_grad():
                tf = timed(lambda: meta_rope(tx))
            ty = meta_rope(tx)
            tb = timed(lambda: torch.autograd.grad(ty, (tx,), td, retain_graph=True))
        rows.append(_row("rope_forward", (B, T, H, hs), dtype, fwd, 2 * x.size * isz, copy_gbps, err, tf,
                         "torch: Meta's complex-multiply apply_rotary_emb"))
        rows.append(_row("rope_backward", (B, T, H, hs), dtype, bwd, 2 * x.size * isz, copy_gbps, berr, tb))
        del x, out

    if want("embedding"):
        ids = rng.integers(0, V, N, dtype=np.int64)
        d = randn(N, C)
        dW = embedding.embedding_backward(ids, d, V)
        err = _rel_err(dW, embedding.embedding_backward_reference(ids, d, V))
        ms = timed(lambda: embedding.embedding_backward(ids, d, V))
        tb = None
        if torch is not None:
            tw, tids, td = t_of(randn(V, C), True), torch.as_tensor(ids, device="cuda"), t_of(d)
            ty = torch.nn.functional.embedding(tids, tw)
            tb = timed(lambda: torch.autograd.grad(ty, (tw,), td, retain_graph=True))
        rows.append(_row("embedding_backward", (N, C, V), dtype, ms, N * C * isz + V * C * isz, copy_gbps, err, tb,
                         "bytes: dout read + dW written (zeroed); includes the device sort"))
        del d, dW

    if want("cross_entropy"):
        logits = randn(N, V, std=2.0)
        targets = rng.integers(0, V, N, dtype=np.int64)
        targets[::97] = -100
        loss, lse = cross_entropy.cross_entropy_forward(logits, targets)
        sub = slice(0, 512)     # the fp32 reference of all N x V rows would need 4 N V bytes
        rl, rlse = cross_entropy.cross_entropy_forward_reference(logits[sub], targets[sub])
        err = max(_rel_err(loss[sub], rl), _rel_err(lse[sub], rlse))
        scale = cp.full(1, 1.0 / N, np.float32)
        dl = cross_entropy.cross_entropy_backward(logits, targets, lse, scale)
        berr = _rel_err(dl[sub], cross_entropy.cross_entropy_backward_reference(logits[sub], targets[sub], lse[sub], 1.0 / N))
        del dl
        fwd = timed(lambda: cross_entropy.cross_entropy_forward(logits, targets))
        out = cp.empty_like(logits)
        bwd = timed(lambda: cross_entropy.cross_entropy_backward(logits, targets, lse, scale, out=out))
        del out
        tf = tb = None
        if torch is not None:
            tl, tt = t_of(logits, True), torch.as_tensor(targets, device="cuda")
            with torch.no_grad():
                tf = timed(lambda: torch.nn.functional.cross_entropy(tl, tt))
            ty = torch.nn.functional.cross_entropy(tl, tt)
            tb = timed(lambda: torch.autograd.grad(ty, (tl,), retain_graph=True))
            del tl, ty
        rows.append(_row("cross_entropy_forward", (N, V), dtype, fwd, N * V * isz, copy_gbps, err, tf))
        rows.append(_row("cross_entropy_backward", (N, V), dtype, bwd, 2 * N * V * isz, copy_gbps, berr, tb,
                         "dlogits written in the logits' dtype"))
        del logits

    if want("adamw"):
        named = [(n, Tensor(randn(*s, std=0.02), requires_grad=True)) for n, s in _model_param_sizes(shape)]
        for _, p in named:
            p.grad = randn(*p.shape, std=1e-3)
        opt = AdamW(named, lr=1e-3, weight_decay=0.1)
        P = sum(p.size for _, p in named)
        lowp = backend.is_low_precision(dtype)
        # g read twice (norm, update); m, v, fp32 master read and written; a bf16/fp16 param written
        nbytes = P * (2 * isz + 6 * 4 + (isz if lowp else 0))
        opt.step(lr=1e-3, clip=1.0)
        ms = timed(lambda: opt.step(lr=1e-3, clip=1.0))
        norm = cp.empty((), np.float32)
        launch = timed(lambda: opt._fused.launch(norm))
        torch_ms = None
        if torch is not None:
            tparams = [torch.nn.Parameter(t_of(p.data).float()) for _, p in named]
            for tp, (_, p) in zip(tparams, named):
                tp.grad = t_of(p.grad).float()
            groups = [{"params": [tp for tp, (n, p) in zip(tparams, named) if decays(n, p)], "weight_decay": 0.1},
                      {"params": [tp for tp, (n, p) in zip(tparams, named) if not decays(n, p)], "weight_decay": 0.0}]
            topt = torch.optim.AdamW(groups, lr=1e-3, fused=True)

            def torch_step():
                torch.nn.utils.clip_grad_norm_(tparams, 1.0, foreach=True)
                topt.step()
            torch_ms = timed(torch_step)
        rows.append(_row("adamw_step", (P,), dtype, ms, nbytes, copy_gbps, None, torch_ms,
                         f"{len(named)} tensors, clip + update, host table upload included; "
                         "torch: fused AdamW + foreach clip on fp32 params"))
        rows.append(_row("adamw_launch", (P,), dtype, launch, nbytes, copy_gbps, None, None,
                         "the three kernels alone (graph-capturable part)"))
    return rows


# ---------------------------------------------------------------- attention (compute-bound)
# Flash attention is judged by TFLOP/s against a measured bf16 GEMM on the same GPU
# (the tensor cores' practical ceiling), and against PyTorch's SDPA flash backend.

def measure_matmul_tflops(n: int = 8192, dtype="bfloat16", reps: int = 10, warmup: int = 3) -> float:
    """TFLOP/s of one n x n x n GEMM through llamac's cuBLAS path: the practical tensor-core ceiling."""
    cp = _cupy("measure_matmul_tflops")
    dt = backend.as_dtype(dtype)
    a = cp.random.default_rng(0).standard_normal((n, n), dtype=np.float32).astype(dt)
    b = a.T.copy()
    out = cp.empty((n, n), dt)
    ms = _time_ms(lambda: cublas.gemm(a, b, out=out), reps, warmup)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def bench_attention_kernels(B: int = 8, H: int = 16, T: int = 2048, head_dims=None, causal: bool = True,
                            dtype="bfloat16", reps: int = 20, torch_compare: bool = True,
                            ceiling_tflops: float | None = None) -> list[dict]:
    """Flash attention forward, backward and both, per head size: ms, TFLOP/s, % of the GEMM
    ceiling, and PyTorch SDPA (flash backend) on the same shape when torch with CUDA imports.

    `torch_over_ours` above 1 means llamac is faster. FLOPs: forward 4 B H T^2 hs, backward
    2.5x that, both halved when causal.
    """

    _cupy("bench_attention_kernels")
    ceiling = ceiling_tflops or measure_matmul_tflops(dtype=dtype)
    dims = head_dims or tuple(hs for hs in flash_forward.HEAD_DIMS if hs in flash_forward.HEAD_DIMS)
    rows = []
    for hs in dims:
        fwd = flash_bench.bench_flash_forward(B=B, H=H, T=T, hs=hs, causal=causal, dtype=dtype, reps=reps,
                                        torch_sdpa=torch_compare)
        (bwd,) = flash_bench.bench_flash_backward(B=B, H=H, T=T, head_dims=(hs,), causal=causal, dtype=dtype,
                                                     reps=reps, torch_compare=torch_compare)
        shape = f"B={B} T={T} H={H} hs={hs}{' causal' if causal else ''}"
        fwd_flops = 4.0 * B * H * T * T * hs * (0.5 if causal else 1.0)
        parts = {
            "flash_attention_forward": (fwd["ms"], fwd_flops, fwd.get("torch_ms")),
            "flash_attention_backward": (bwd["bwd_ms"], 2.5 * fwd_flops, bwd.get("torch_bwd_ms")),
            "flash_attention_fwd+bwd": (fwd["ms"] + bwd["bwd_ms"], 3.5 * fwd_flops, bwd.get("torch_fwd_bwd_ms")),
        }
        for op, (ms, flops, torch_ms) in parts.items():
            tflops = flops / (ms * 1e-3) / 1e12
            torch_ms = torch_ms if isinstance(torch_ms, (int, float)) else None
            rows.append({"op": op, "shape": shape, "dtype": str(backend.as_dtype(dtype)), "ms": ms,
                         "tflops": tflops, "ceiling_tflops": ceiling, "pct_of_ceiling": 100.0 * tflops / ceiling,
                         "torch_ms": torch_ms, "torch_over_ours": (torch_ms / ms) if torch_ms else None})
    return rows
