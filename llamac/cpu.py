"""Row-parallel NumPy: elementwise and per-row work split across the CPU cores.

A NumPy ufunc runs on one core, but it releases the GIL inside its loop, so threads that
each take a block of rows run side by side. The fused CPU references (SwiGLU, softmax,
RMSNorm, cross-entropy, attention) call `for_row_blocks` with a function that works on rows
[start, stop) of preallocated arrays; small arrays run inline, where threads cost more.

While the blocks run, OpenBLAS is held to one thread: each block's small matmuls (attention's
per-head products) then run in the calling thread, side by side. Left at its default, OpenBLAS
splits every product over (and synchronises) all cores from both threads at once, which made
the threaded attention no faster than one thread.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIN_ELEMENTS = 1 << 17          # below this a thread hand-off costs more than it saves
MIN_MATMUL_FLOPS = 1 << 21      # multiply-adds below which a product runs on one thread
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_inside = threading.local()     # set while a thread runs a block: nested calls run inline


def n_threads() -> int:
    return max(1, int(os.environ.get("LLAMAC_CPU_THREADS", os.cpu_count() or 1)))


def for_row_blocks(fn, n_rows: int, elements: int) -> None:
    """Call fn(start, stop) over blocks of rows covering [0, n_rows), in parallel when worth it."""
    threads = min(n_threads(), n_rows)
    if threads < 2 or elements < MIN_ELEMENTS or getattr(_inside, "on", False):
        fn(0, n_rows)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n_threads(), thread_name_prefix="llamac-cpu")
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    with _lock:                 # one threaded region at a time: the BLAS setting below is process-wide
        previous = _blas_threads(1)
        try:
            futures = [_pool.submit(_block, fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:]) if b > a]
            try:
                _block(fn, bounds[0], bounds[1])    # the calling thread takes the first block
            finally:
                for f in futures:
                    f.result()
        finally:
            _blas_threads(previous)


def _block(fn, a, b):
    _inside.on = True
    try:
        fn(a, b)
    finally:
        _inside.on = False


def matmul(a, b):
    """2-D a @ b with the output split over the cores: rows of a (or, for a wide output, columns
    of b) per thread, one-threaded OpenBLAS in each. As fast as OpenBLAS's own threads on the
    training shapes, and it leaves no OpenBLAS worker spinning afterwards: those spin ~0.1 s after
    every threaded product and took a core from the row-block threads (2x slower attention)."""
    M, N = a.shape[0], b.shape[1]
    out = np.empty((M, N), np.result_type(a.dtype, b.dtype))
    threads = min(n_threads(), max(M, N))
    if threads < 2 or M * N * a.shape[1] < MIN_MATMUL_FLOPS:
        with _lock:
            previous = _blas_threads(1)     # a mid-sized product would wake OpenBLAS's workers
            try:
                return np.matmul(a, b, out=out)
            finally:
                _blas_threads(previous)
    if M >= N:
        for_row_blocks(lambda i, j: np.matmul(a[i:j], b, out=out[i:j]), M, 1 << 30)
    else:
        for_row_blocks(lambda i, j: np.matmul(a, b[:, i:j], out=out[:, i:j]), N, 1 << 30)
    return out


# ---------------------------------------------------------------- OpenBLAS thread count

_blas_api = None                # (set, get) ctypes functions, False when none was found


def _find_blas():
    """OpenBLAS's set/get_num_threads from the library NumPy loaded (as threadpoolctl finds them);
    False where there is none (another BLAS, or no /proc): then the thread count is left alone."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                               ("openblas_", "")):
            try:
                set_n = getattr(lib, f"{prefix}set_num_threads{suffix}")
                get_n = getattr(lib, f"{prefix}get_num_threads{suffix}")
            except AttributeError:
                continue
            set_n.argtypes, set_n.restype, get_n.restype = [ctypes.c_int], None, ctypes.c_int
            return set_n, get_n
    return False


def _blas_threads(n: int | None) -> int | None:
    """Set OpenBLAS's thread count (None: leave it); returns the previous count, None if unknown."""
    global _blas_api
    if _blas_api is None:
        _blas_api = _find_blas()
    if not _blas_api or n is None:
        return None
    set_n, get_n = _blas_api
    previous = get_n()
    if previous != n:
        set_n(n)
    return previous
