"""GPU timings of the hand-written kernels, as plain dicts (the caller prints the tables).

Memory-bound kernels are judged by bandwidth: bytes the op must read and write
over time, against a measured device-to-device copy on the same GPU (the
practical ceiling), and against PyTorch's eager version of the same op when
torch with CUDA is installed. Imports with no GPU; the functions raise
LlamacError when called without one.
"""
from __future__ import annotations

import statistics

import numpy as np

from llamac import backend, kernels
from llamac.errors import LlamacError

DEFAULT_SIZES = (1 << 16, 1 << 20, 1 << 24, 1 << 26)
# Bigger than H100's 50 MB L2, so the copy and a flush stream from DRAM.
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20


def _cupy(what: str):
    try:
        return backend.cupy_module()
    except LlamacError as exc:
        raise LlamacError(f"{what} needs a CUDA GPU with CuPy: {exc}") from None


def _time_ms(fn, reps: int, warmup: int, between=None) -> float:
    """Median milliseconds of fn() on the GPU, from CUDA events around each call.

    Events are recorded without synchronizing between reps, so the GPU runs
    ahead of Python and host launch overhead stays out of the timing once the
    kernel takes longer than a launch. `between` runs outside the events
    (e.g. an L2 flush).
    """
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(reps):
        if between is not None:
            between()
        start, end = backend.cuda_event(), backend.cuda_event()
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    return statistics.median(backend.elapsed_ms(s, e) for s, e in pairs)


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
    """Time kernels.swiglu_forward/backward on the GPU; one dict per (size, direction).

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

        kernels.swiglu_forward(gate, up, out=out)
        fwd_err = _rel_err(out, kernels.swiglu_forward_reference(gate, up))
        kernels.swiglu_backward(gate, up, dout, dgate=dgate, dup=dup)
        ref_dgate, ref_dup = kernels.swiglu_backward_reference(gate, up, dout)
        bwd_err = max(_rel_err(dgate, ref_dgate), _rel_err(dup, ref_dup))

        fwd_ms = _time_ms(lambda: kernels.swiglu_forward(gate, up, out=out), reps, warmup, between)
        bwd_ms = _time_ms(lambda: kernels.swiglu_backward(gate, up, dout, dgate=dgate, dup=dup),
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
