"""GPU timers shared by the benchmarks (CUDA events around each call, medians) and their failed rows."""
from __future__ import annotations

import statistics

from llamac.engine import backend


def _time_ms(fn, reps: int = 20, warmup: int = 3, between=None) -> float:
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


_COPY_BANDWIDTH: dict = {}


def device_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting each byte read and written (the decode
    roofline), measured once per process."""
    if "bw" not in _COPY_BANDWIDTH:
        cp = backend.cupy_module()
        a = cp.empty(nbytes, dtype=cp.uint8)
        b = cp.empty_like(a)
        ms = _time_ms(lambda: cp.copyto(b, a), reps=10)
        _COPY_BANDWIDTH["bw"] = 2 * nbytes / (ms / 1e3)
        del a, b
        backend.release_gpu_memory()
    return _COPY_BANDWIDTH["bw"]


def torch_time_ms(torch, fn, reps: int, warmup: int) -> float:
    """Median milliseconds of a PyTorch op from torch's own CUDA events, each rep waited for."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def is_oom(exc) -> bool:
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def error_row(row: dict, exc) -> dict:
    """A benchmark row that failed, with its traceback printed: OOM, or the error in a few words."""
    import traceback
    traceback.print_exc()
    return {**row, "status": "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:120]}"}
