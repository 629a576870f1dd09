"""Row-parallel NumPy: elementwise and per-row work split across the CPU cores.

A NumPy ufunc runs on one core, but it releases the GIL inside its loop, so threads that
each take a block of rows run side by side. The fused CPU references (SwiGLU, softmax,
RMSNorm, cross-entropy) call `for_row_blocks` with a function that works on rows
[start, stop) of preallocated arrays; small arrays run inline, where threads cost more.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

MIN_ELEMENTS = 1 << 17          # below this a thread hand-off costs more than it saves
_pool: ThreadPoolExecutor | None = None


def n_threads() -> int:
    return max(1, int(os.environ.get("LLAMAC_CPU_THREADS", os.cpu_count() or 1)))


def for_row_blocks(fn, n_rows: int, elements: int) -> None:
    """Call fn(start, stop) over blocks of rows covering [0, n_rows), in parallel when worth it."""
    threads = min(n_threads(), n_rows)
    if threads < 2 or elements < MIN_ELEMENTS:
        fn(0, n_rows)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n_threads(), thread_name_prefix="llamac-cpu")
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for f in futures:
        f.result()
