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

from llamac import runtime

MIN_ELEMENTS = 1 << 17          # below this a thread hand-off costs more than it saves
MIN_MATMUL_FLOPS = 1 << 21      # multiply-adds below which a product runs on one thread
CHUNK_BYTES = 1 << 19           # per array, for chains of passes that should stay in the L2 cache
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_inside = threading.local()     # set while a thread runs a block: nested calls run inline


_cpu_count = os.cpu_count() or 1       # os.cpu_count() costs ~7 us: not on every call


def n_threads() -> int:
    return max(1, int(runtime.options().cpu_threads or _cpu_count))


def for_row_blocks(fn, n_rows: int, elements: int, row_bytes: int = 0) -> None:
    """Call fn(start, stop) over blocks of rows covering [0, n_rows), in parallel when worth it.
    With row_bytes (the bytes of one row of one array), each thread walks its rows in chunks of
    about CHUNK_BYTES per array, so that a chain of elementwise passes over a chunk stays in the
    L2 cache instead of streaming every pass through memory."""
    if not _malloc_tuned:
        keep_freed_memory()
    step = max(1, CHUNK_BYTES // row_bytes) if row_bytes else n_rows
    if step < n_rows:
        fn = _chunked(fn, step)
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
            futures = [_pool.submit(_block, fn, a, b, i + 1)
                       for i, (a, b) in enumerate(zip(bounds[1:-1], bounds[2:])) if b > a]
            try:
                _block(fn, bounds[0], bounds[1], 0)     # the calling thread takes the first block
            finally:
                for f in futures:
                    f.result()
        finally:
            _blas_threads(previous)


def _chunked(fn, step):
    def run(a, b):
        for i in range(a, b, step):
            fn(i, min(i + step, b))
    return run


def _block(fn, a, b, index):
    _inside.on, _inside.block = True, index
    try:
        fn(a, b)
    finally:
        _inside.on, _inside.block = False, 0


def in_block() -> bool:
    """Whether this thread is running a block of a for_row_blocks call (the cores are taken)."""
    return getattr(_inside, "on", False)


def block_id() -> int:
    """Which block of the current for_row_blocks call this thread runs (0 when inline): lets a
    block keep its own partial sums, to be added in a fixed order afterwards."""
    return getattr(_inside, "block", 0)


def matmul(a, b, out=None, beta: float = 0.0):
    """2-D a @ b with the output split over the cores: rows of a (or, for a wide output, columns
    of b) per thread, one-threaded OpenBLAS in each. As fast as OpenBLAS's own threads on the
    training shapes, and it leaves no OpenBLAS worker spinning afterwards: those spin ~0.1 s after
    every threaded product and took a core from the row-block threads (2x slower attention).

    out (C-contiguous, M x N) receives the result; beta=1 adds it to what out holds. For float32
    operands that sgemm (OpenBLAS's, through ctypes) can read as they lie, the add happens inside
    the GEMM: no temporary and no extra pass over out (a summed input gradient)."""
    if not _malloc_tuned:
        keep_freed_memory()
    M, N = a.shape[0], b.shape[1]
    fused = out is not None and beta and sgemm_takes(a, b, out)
    if out is not None and beta and not fused:
        result = matmul(a, b)
        if beta != 1:
            out *= out.dtype.type(beta)
        out += result
        return out
    if out is None:
        out = np.empty((M, N), np.result_type(a.dtype, b.dtype))

    def product(a, b, c):                   # c = a @ b (+ c with beta)
        if fused:
            sgemm(a, b, c, beta)
        else:
            np.matmul(a, b, out=c)

    threads = min(n_threads(), max(M, N))
    if getattr(_inside, "on", False):       # inside a block: OpenBLAS is on one thread already
        product(a, b, out)
        return out
    if threads < 2 or M * N * a.shape[1] < MIN_MATMUL_FLOPS:
        with _lock:
            previous = _blas_threads(1)     # a mid-sized product would wake OpenBLAS's workers
            try:
                product(a, b, out)
                return out
            finally:
                _blas_threads(previous)
    K = a.shape[1]
    if fused:                               # rows of out per thread, each added into in place
        for_row_blocks(lambda i, j: sgemm(a[i:j], b, out[i:j], beta), M, 1 << 30)
        return out
    if K >= 2 * max(M, N):
        # A weight gradient (tokens as the inner dimension): each thread sums over its own
        # tokens, the rows it produced in the forward and still has in its cache.
        parts = {}

        def partial(i, j):
            parts[i] = np.matmul(a[:, i:j], b[i:j])

        for_row_blocks(partial, K, 1 << 30)
        keys = sorted(parts)
        np.copyto(out, parts[keys[0]])
        for k in keys[1:]:
            out += parts[k]
        return out
    if M >= N:
        for_row_blocks(lambda i, j: np.matmul(a[i:j], b, out=out[i:j]), M, 1 << 30)
    else:
        for_row_blocks(lambda i, j: np.matmul(a, b[:, i:j], out=out[:, i:j]), N, 1 << 30)
    return out


# ---------------------------------------------------------------- sgemm with beta

_sgemm_fn = None                # (function, blas int type), False when none was found
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _find_sgemm():
    """cblas_sgemm from the OpenBLAS NumPy loaded (NumPy's own wheels: scipy_cblas_sgemm64_, 64-bit
    ints), False where there is none."""
    for lib in _openblas_libraries():
        for name, int_t in (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                            ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int)):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_t, int_t, int_t, ctypes.c_float,
                           ctypes.c_void_p, int_t, ctypes.c_void_p, int_t, ctypes.c_float, ctypes.c_void_p, int_t]
            return fn, int_t
    return False


def _operand(m):
    """(transpose flag, leading dimension in elements) of a float32 matrix sgemm reads in place:
    rows contiguous (C order, row stride >= columns) or its transpose; None otherwise."""
    if m.strides[1] == 4 and m.strides[0] >= 4 * max(m.shape[1], 1) and m.strides[0] % 4 == 0:
        return _NO_TRANS, m.strides[0] // 4
    if m.strides[0] == 4 and m.strides[1] >= 4 * max(m.shape[0], 1) and m.strides[1] % 4 == 0:
        return _TRANS, m.strides[1] // 4
    return None


def sgemm_takes(a, b, c) -> bool:
    """Whether sgemm can compute c (+)= a @ b on these arrays in place (float32, 2-D, every
    dimension nonzero, c's rows contiguous) and an sgemm was found."""
    global _sgemm_fn
    if not (a.dtype == b.dtype == c.dtype == np.float32 and a.ndim == b.ndim == c.ndim == 2
            and a.size and b.size and c.size and c.strides[1] == 4 and c.strides[0] % 4 == 0
            and c.strides[0] >= 4 * c.shape[1] and _operand(a) and _operand(b)):
        return False
    if _sgemm_fn is None:
        _sgemm_fn = _find_sgemm()
    return bool(_sgemm_fn)


def sgemm(a, b, c, beta: float = 0.0):
    """c = a @ b + beta c with OpenBLAS's sgemm (check sgemm_takes first); c's rows may be a
    block of a larger array (its leading dimension is c's row stride)."""
    fn, _ = _sgemm_fn
    (ta, lda), (tb, ldb) = _operand(a), _operand(b)
    M, K = a.shape
    N = b.shape[1]
    fn(_ROW_MAJOR, ta, tb, M, N, K, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, float(beta),
       c.ctypes.data, c.strides[0] // 4)


# ---------------------------------------------------------------- malloc

_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves arrays of 32 MiB and more (the tiny recipe's logits) with a fresh
    mmap, and trims the heap as soon as a training step frees its activations, so every step
    faults all its big arrays in again, page by page (zeroed by the kernel; its cost in a step is
    in BENCHMARKS.md). Here every allocation comes from the heap and the heap is
    never trimmed: the process stays at its peak size, as with a caching allocator. The setting
    is process-wide (other libraries in the process, PyTorch included, get it too); it is made on
    llamac's first CPU matmul or row-block call. LLAMAC_CPU_MALLOC=0 leaves glibc alone.
    Returns whether the settings were applied (False off glibc)."""
    global _malloc_tuned
    _malloc_tuned = True
    if not runtime.options().cpu_malloc_tuning:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------- OpenBLAS thread count

_blas_api = None                # (set, get) ctypes functions, False when none was found


def _openblas_libraries():
    """The OpenBLAS libraries this process has loaded (NumPy's), as ctypes handles."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _find_blas():
    """OpenBLAS's set/get_num_threads from the library NumPy loaded (as threadpoolctl finds them);
    False where there is none (another BLAS, or no /proc): then the thread count is left alone."""
    for lib in _openblas_libraries():
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
