"""Flash attention forward and backward benchmarks: TFLOP/s of each kernel and of PyTorch's SDPA at the same shape."""
from __future__ import annotations

import math

import numpy as np

from llamac.bench.timing import _time_ms, torch_time_ms
from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.ops.flash_backward import backward_flops, default_tiles, flash_attention_backward, tiles_fit
from llamac.ops.flash_forward import default_config, flash_attention_forward

# ---------------------------------------------------------------- benchmark


def bench_flash_forward(B=8, H=16, T=2048, hs=128, Hkv=None, causal=True, dtype="bfloat16",
                        reps=20, torch_sdpa=True, config=None) -> dict:
    """Forward TFLOP/s of the kernel at (B, T, H, hs), and of torch's SDPA flash backend when torch
    with CUDA is installed. FLOPs: 2 matmuls * 2 B H T^2 hs, halved when causal."""
    cp = backend.cupy_module()
    dt = backend.as_dtype(dtype)
    Hkv = Hkv or H
    rng = cp.random.default_rng(0)
    q = rng.standard_normal((B, T, H, hs), dtype=np.float32).astype(dt)
    k = rng.standard_normal((B, T, Hkv, hs), dtype=np.float32).astype(dt)
    v = rng.standard_normal((B, T, Hkv, hs), dtype=np.float32).astype(dt)
    flops = 4.0 * B * H * T * T * hs * (0.5 if causal else 1.0)
    ms = _time_ms(lambda: flash_attention_forward(q, k, v, causal=causal, config=config), reps)
    result = {"B": B, "H": H, "Hkv": Hkv, "T": T, "hs": hs, "causal": causal, "dtype": str(dt),
              "config": tuple(config or default_config(hs, q.device.id)),
              "ms": ms, "tflops": flops / ms / 1e9}
    if torch_sdpa:
        try:
            import torch  # noqa: PLC0415 - optional, for the comparison only
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
        except Exception:
            return result
        if not torch.cuda.is_available():
            return result
        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[str(dt)]
        tq, tk, tv = (torch.randn(B, n, T, hs, device="cuda", dtype=tdt) for n in (H, Hkv, Hkv))
        if Hkv != H:  # SDPA's flash backend wants equal heads: expand (a view, no copy) as callers do
            tk = tk.repeat_interleave(H // Hkv, dim=1)
            tv = tv.repeat_interleave(H // Hkv, dim=1)
        f = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            tms = torch_time_ms(torch, lambda: f(tq, tk, tv, is_causal=causal), reps, 3)
        result.update(torch_ms=tms, torch_tflops=flops / tms / 1e9, ratio_vs_torch=tms / ms)
    return result



def bench_flash_backward(B: int = 8, H: int = 16, T: int = 2048, head_dims=(64, 128), Hkv: int | None = None,
                         causal: bool = True, dtype="bfloat16", reps: int = 20, warmup: int = 3,
                         tiles=(None,), torch_compare: bool = True) -> list[dict]:
    """Time flash_attention_backward (bf16) per head_dim and tile variant in `tiles`: ms and
    TFLOP/s; with torch, SDPA's flash backend forward and forward+backward on the same shapes
    (its backward = the difference)."""
    try:
        cp = backend.cupy_module()
    except LlamacError as exc:
        raise LlamacError(f"bench_flash_backward needs a CUDA GPU with CuPy: {exc}") from None
    dtype = backend.as_dtype(dtype)
    Hkv = Hkv or H
    rows = []
    for hs in head_dims:
        rng = cp.random.default_rng(0)
        q = rng.standard_normal((B, T, H, hs), dtype=np.float32).astype(dtype)
        k = rng.standard_normal((B, T, Hkv, hs), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((B, T, Hkv, hs), dtype=np.float32).astype(dtype)
        dout = rng.standard_normal((B, T, H, hs), dtype=np.float32).astype(dtype)
        # Any out and lse time the same; plausible ones keep the exponentials in range.
        out = rng.standard_normal((B, T, H, hs), dtype=np.float32).astype(dtype)
        lse = cp.full((B, H, T), math.log(T) + 2.0, np.float32)
        flops = backward_flops(B, H, T, T, hs, causal)
        for tile in tiles:
            if tile is not None and not tiles_fit(hs, tile):
                continue   # (32, 8, *) does not build at hs=48
            ms = _time_ms(lambda: flash_attention_backward(q, k, v, out, dout, lse, causal, tiles=tile), reps, warmup)
            used = tile or default_tiles(hs, T, backend.compute_capability())
            row = {"B": B, "H": H, "Hkv": Hkv, "T": T, "hs": hs, "causal": causal, "tiles": used,
                   "bwd_ms": ms, "bwd_tflops": flops / (ms * 1e-3) / 1e12}
            rows.append(row)
        if torch_compare:
            rows[-1].update(_torch_sdpa_times(q, k, v, dout, causal, reps, warmup, flops))
    return rows


def _torch_sdpa_times(q, k, v, dout, causal, reps, warmup, flops) -> dict:
    try:
        import torch  # noqa: PLC0415 - optional, only for the comparison
        import torch.nn.functional as F  # noqa: PLC0415
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    except Exception as exc:
        return {"torch": f"unavailable ({type(exc).__name__})"}
    try:
        def t(x):  # (B, T, H, hs) -> torch (B, H, T, hs), bf16, same values
            return torch.as_tensor(x.astype(np.float32), device="cuda").to(torch.bfloat16).transpose(1, 2).contiguous()

        tq, tk, tv, tdo = t(q), t(k), t(v), t(dout)
        tq.requires_grad_(True)
        tk.requires_grad_(True)
        tv.requires_grad_(True)
        gqa = tq.shape[1] != tk.shape[1]

        def fwd():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)

        def fwd_bwd():
            o = fwd()
            o.backward(tdo)

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            f_ms = torch_time_ms(torch, fwd, reps, warmup)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fb_ms = torch_time_ms(torch, fwd_bwd, reps, warmup)
        b_ms = fb_ms - f_ms
        return {"torch_fwd_ms": f_ms, "torch_fwd_bwd_ms": fb_ms, "torch_bwd_ms": b_ms,
                "torch_bwd_tflops": flops / (b_ms * 1e-3) / 1e12}
    except Exception as exc:  # a torch without the flash backend for these shapes, say
        return {"torch": f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"}
