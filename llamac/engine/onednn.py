"""bf16 matrix products on the CPU: oneDNN's matmul through ctypes (the `cpu-bf16` extra).

Products take fp32 operands, multiply them in bf16 and accumulate and write fp32. Each operand is
rounded to bf16 (to nearest even) by a oneDNN reorder into this thread's scratch, laid out as the
bf16 kernels read it, and a bf16 x bf16 -> fp32 matmul multiplies the two. (oneDNN's "bf16 fpmath
mode" on fp32 operands would skip the copies, but oneDNN 3.2 runs it in bf16 only on AMX: on an
AVX512-BF16 processor it silently takes its fp32 kernel.) The reorders read the operands in
place through their strides (transposed matrices, heads inside the rows, a batch dimension of 1
broadcast) and cost a few percent of the product. One set of primitives per (shapes, strides,
beta, thread count) and thread, made on first use.

Only where the processor multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo), the
library loads, and the matmul oneDNN picks for bf16 here is one of its bf16 kernels (its
implementation name, asked once); `unavailable()` says why not otherwise."""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import numpy as np

from llamac import runtime
from llamac.engine import cpu

_MAX_NDIMS = 12
_BF16, _F32 = 2, 3                      # dnnl_data_type_t
_CPU = 1                                # dnnl_engine_kind_t
_QUERY_IMPL_INFO = 8                    # dnnl_query_impl_info_str
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33    # a reorder's from / to are src / dst
_ALIGN = 64                             # bytes: scratch starts on a cache line
_Dims = ctypes.c_int64 * _MAX_NDIMS


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


_state = None                           # (lib, engine, stream, omp_set_num_threads) once loaded; else why not
_local = threading.local()              # each thread's primitives: never executed by two threads at once
_NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_flags() -> list[str]:
    """The processor's bf16 multiply instructions named in /proc/cpuinfo ([] where none or unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in _NATIVE_FLAGS if name in flags]
    except OSError:
        pass
    return []


def _library_paths():
    chosen = runtime.options().onednn_library
    if chosen:
        return [chosen]
    roots = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    return [p for r in sorted(roots) for p in sorted(glob.glob(os.path.join(r, "lib", "libdnnl.so*")))] + ["libdnnl.so.3"]


def _load():
    global _state
    if _state is not None:
        return _state
    if not native_bf16_flags():
        _state = "this CPU has no native bf16 multiply (avx512_bf16 or amx_bf16)"
        return _state
    lib = None
    # OpenMP's threads sleep between products instead of spinning: a spinning thread took a core
    # from the NumPy row blocks between the products, and on a shared machine a team waiting for
    # a preempted member spun away a time slice (2048x256x768: 6 ms a product instead of 1.2).
    # libgomp reads this once, as it loads with oneDNN; the process's environment is left as it was.
    # Where another library loaded libgomp first (PyTorch, in llamac bench), oneDNN shares that
    # one and its policy: the bench loads oneDNN first.
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = saved or "PASSIVE"
    failure = None
    try:
        for path in _library_paths():
            try:
                lib = ctypes.CDLL(path)
                break
            except OSError as exc:
                if os.path.exists(path):        # there, but it did not load (a missing libgomp.so.1, ...)
                    failure = f"oneDNN at {path} did not load: {str(exc).splitlines()[0]}"
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]
    if lib is None:
        _state = failure or "oneDNN is not installed (pip install 'llamac[cpu-bf16]')"
        return _state
    p = ctypes.c_void_p
    for name, args in (("dnnl_engine_create", [ctypes.POINTER(p), ctypes.c_int, ctypes.c_size_t]),
                       ("dnnl_stream_create", [ctypes.POINTER(p), p, ctypes.c_uint]),
                       ("dnnl_stream_wait", [p]),
                       ("dnnl_memory_desc_create_with_strides", [ctypes.POINTER(p), ctypes.c_int, _Dims, ctypes.c_int,
                                                                 _Dims]),
                       ("dnnl_memory_desc_destroy", [p]),
                       ("dnnl_primitive_attr_create", [ctypes.POINTER(p)]),
                       ("dnnl_primitive_attr_destroy", [p]),
                       ("dnnl_primitive_attr_set_post_ops", [p, p]),
                       ("dnnl_post_ops_create", [ctypes.POINTER(p)]),
                       ("dnnl_post_ops_destroy", [p]),
                       ("dnnl_post_ops_append_sum", [p, ctypes.c_float, ctypes.c_int32, ctypes.c_int]),
                       ("dnnl_matmul_primitive_desc_create", [ctypes.POINTER(p), p, p, p, p, p, p]),
                       ("dnnl_reorder_primitive_desc_create", [ctypes.POINTER(p), p, p, p, p, p]),
                       ("dnnl_primitive_desc_query", [p, ctypes.c_int, ctypes.c_int, p]),
                       ("dnnl_primitive_desc_destroy", [p]),
                       ("dnnl_primitive_create", [ctypes.POINTER(p), p]),
                       ("dnnl_memory_create", [ctypes.POINTER(p), p, p, p]),
                       ("dnnl_memory_set_data_handle", [p, p]),
                       ("dnnl_primitive_execute", [p, p, ctypes.c_int, ctypes.POINTER(_ExecArg)])):
        fn = getattr(lib, name, None)
        if fn is None:
            _state = f"the oneDNN library found has no {name} (oneDNN 3 is needed)"
            return _state
        fn.argtypes, fn.restype = args, ctypes.c_int
    try:
        # the OpenMP runtime oneDNN runs on (loaded with it: this is the same library)
        set_threads = ctypes.CDLL("libgomp.so.1").omp_set_num_threads
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
    except (OSError, AttributeError):
        set_threads = None
    engine, stream = p(), p()
    if lib.dnnl_engine_create(ctypes.byref(engine), _CPU, 0) or lib.dnnl_stream_create(ctypes.byref(stream), engine, 1):
        _state = "oneDNN could not create a CPU engine"
        return _state
    kernel = _probe(lib, engine)
    if kernel is None or not _is_bf16_kernel(kernel):
        _state = ("oneDNN has no bf16 matmul here" if kernel is None else
                  f"oneDNN's bf16 matmul here is {kernel}, not a native bf16 kernel")
        return _state
    _state = (lib, engine, stream, set_threads)
    return _state


_NATIVE_KERNELS = ("avx512_core_bf16", "avx512_core_amx")


def _is_bf16_kernel(name: str) -> bool:
    """Whether a oneDNN implementation name is one of its kernels for a native bf16 multiply
    (brg:avx512_core_bf16, brg:avx512_core_amx, ...). Others emulate bf16 at a fraction of the rate
    (gemm:jit:bf16 where oneDNN is held to avx512_core) or compute in fp32 (brg:avx512_core)."""
    return any(isa in name for isa in _NATIVE_KERNELS)


def _implementation(lib, pd) -> str:
    name = ctypes.c_char_p()
    if lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(name)) or not name.value:
        return "unknown"
    return name.value.decode(errors="replace")


def _probe(lib, engine) -> str | None:
    """The implementation oneDNN picks for a plain 64x64x64 bf16 x bf16 -> fp32 matmul on this CPU
    (None where it has none)."""
    p = ctypes.c_void_p
    descs = [_desc(lib, (64, 64), (64, 1), dt) for dt in (_BF16, _BF16, _F32)]
    pd = p()
    try:
        if lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), engine, descs[0], descs[1], None, descs[2], None):
            return None
        try:
            return _implementation(lib, pd)
        finally:
            lib.dnnl_primitive_desc_destroy(pd)
    finally:
        for md in descs:
            lib.dnnl_memory_desc_destroy(md)


def unavailable() -> str | None:
    """None when bf16 products can run here, else the reason they cannot (one line)."""
    state = _load()
    return state if isinstance(state, str) else None


def available() -> bool:
    return unavailable() is None


def bf16_products() -> bool:
    """Whether the CPU's products run here in bf16 now (runtime option cpu_bf16_products, and available())."""
    return runtime.options().cpu_bf16_products and available()


def takes(a, b, out=None) -> bool:
    """Whether matmul can run a @ b into out: fp32 matrices (or stacks of them, batch dimensions
    equal or 1) with no empty dimension, and an fp32 out of the result's shape."""
    if not (a.dtype == b.dtype == np.float32 and 2 <= a.ndim == b.ndim <= _MAX_NDIMS and a.size and b.size
            and a.shape[-1] == b.shape[-2]):
        return False
    if any(x != y and 1 not in (x, y) for x, y in zip(a.shape[:-2], b.shape[:-2])):
        return False
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    return out is None or (out.dtype == np.float32 and out.shape == shape)


def _check(status: int, what: str):
    if status:
        raise RuntimeError(f"oneDNN {what} failed (status {status})")


def _desc(lib, shape, strides, dtype):
    md = ctypes.c_void_p()
    _check(lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(shape), _Dims(*shape), dtype,
                                                    _Dims(*strides)), "memory_desc")
    return md


def _primitive(lib, create, *args, what: str):
    """A primitive from its descriptor's create function, and the implementation oneDNN chose."""
    pd, prim = ctypes.c_void_p(), ctypes.c_void_p()
    _check(create(ctypes.byref(pd), *args), f"{what} descriptor")
    try:
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), f"{what} primitive")
        return prim, _implementation(lib, pd)
    finally:
        lib.dnnl_primitive_desc_destroy(pd)


def _dense_strides(shape, row_major: bool) -> list[int]:
    """Strides of a dense copy: batch dimensions outermost-first, each matrix row- or column-major."""
    *batch, rows, cols = shape
    strides, extent = ([cols, 1] if row_major else [1, rows]), rows * cols
    for n in reversed(batch):
        strides.insert(0, extent)
        extent *= n
    return strides


def _row_major(arr) -> bool:
    st = _strides(arr)
    return st[-1] <= st[-2]


def _scratch(sizes):
    """This thread's bf16 scratch for the two operands (uint16 words, cache-line aligned), grown
    as needed: a product's copies live only while it runs, so every product shares them."""
    have = getattr(_local, "scratch", None)
    if have is None or any(h.size < n for h, n in zip(have, sizes)):
        have = _local.scratch = [h if h is not None and h.size >= n else _aligned_words(n)
                                 for h, n in zip(have or (None, None), sizes)]
        _local.addresses = [h.ctypes.data for h in have]
    return _local.addresses


def _aligned_words(n):
    raw = np.empty(n + _ALIGN // 2, np.uint16)
    start = (-raw.ctypes.data % _ALIGN) // 2
    return raw[start:start + n]


class _Product:
    """out = a @ b (+ beta out) for one layout of the operands: a reorder per operand rounding it
    to bf16 (to nearest even) into the thread's scratch, dense, each matrix row- or column-major as
    it was (a transposed a timed as fast as a row-major copy, or faster), then the bf16 x bf16 ->
    fp32 matmul; memory objects whose handles change per call."""

    def __init__(self, lib, engine, stream, a, b, out, beta):
        p = ctypes.c_void_p
        self.lib, self.stream = lib, stream
        self.sizes = (a.size, b.size)
        descs, attr, post = [], p(), None
        try:
            wide = [_desc(lib, x.shape, _strides(x), _F32) for x in (a, b)]
            descs += wide
            narrow = [_desc(lib, x.shape, _dense_strides(x.shape, _row_major(x)), _BF16) for x in (a, b)]
            descs += narrow
            descs.append(_desc(lib, out.shape, _strides(out), _F32))
            self.reorders = [_primitive(lib, lib.dnnl_reorder_primitive_desc_create, w, engine, n, engine, None,
                                        what="reorder")[0] for w, n in zip(wide, narrow)]
            _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attr")
            if beta:
                post = p()
                _check(lib.dnnl_post_ops_create(ctypes.byref(post)), "post_ops")
                _check(lib.dnnl_post_ops_append_sum(post, float(beta), 0, 0), "sum post-op")
                _check(lib.dnnl_primitive_attr_set_post_ops(attr, post), "post_ops")
            self.multiply_primitive, self.implementation = _primitive(
                lib, lib.dnnl_matmul_primitive_desc_create, engine, narrow[0], narrow[1], None, descs[-1], attr,
                what="matmul")
            # memories: a, a in bf16, b, b in bf16, out
            self.memories = []
            for md in (wide[0], narrow[0], wide[1], narrow[1], descs[-1]):
                mem = p()
                _check(lib.dnnl_memory_create(ctypes.byref(mem), md, engine, None), "memory")
                self.memories.append(mem)
        finally:
            if post is not None:
                lib.dnnl_post_ops_destroy(post)
            if attr:
                lib.dnnl_primitive_attr_destroy(attr)
            for md in descs:
                lib.dnnl_memory_desc_destroy(md)
        _implementations.add(self.implementation)
        m = self.memories
        self.steps = [(self.reorders[0], 2, _args((_ARG_SRC, m[0]), (_ARG_DST, m[1]))),
                      (self.reorders[1], 2, _args((_ARG_SRC, m[2]), (_ARG_DST, m[3]))),
                      (self.multiply_primitive, 3, _args((_ARG_SRC, m[1]), (_ARG_WEIGHTS, m[3]), (_ARG_DST, m[4])))]

    def __call__(self, a, b, out):
        lib = self.lib
        low_a, low_b = _scratch(self.sizes)
        for mem, address in zip(self.memories, (a.ctypes.data, low_a, b.ctypes.data, low_b, out.ctypes.data)):
            lib.dnnl_memory_set_data_handle(mem, address)
        for primitive, n, args in self.steps:
            _check(lib.dnnl_primitive_execute(primitive, self.stream, n, args), "matmul")
        lib.dnnl_stream_wait(self.stream)
        return out

    def multiply(self):
        """The bf16 matmul alone on the operands the last call rounded (what bench times as oneDNN's own)."""
        primitive, n, args = self.steps[2]
        _check(self.lib.dnnl_primitive_execute(primitive, self.stream, n, args), "matmul")
        self.lib.dnnl_stream_wait(self.stream)


def _args(*pairs):
    return (_ExecArg * len(pairs))(*(_ExecArg(k, m) for k, m in pairs))


_implementations: set[str] = set()


def implementations() -> set[str]:
    """The implementations oneDNN chose for the products made so far (names as ONEDNN_VERBOSE prints)."""
    return set(_implementations)


def _strides(arr):
    """Strides in elements; a dimension of one (a NumPy new axis has stride 0) gets the extent of
    the dimensions inside it, so that a plain layout still reads as plain."""
    out = [s // arr.itemsize for s in arr.strides]
    for d in range(arr.ndim - 1, -1, -1):
        if arr.shape[d] == 1:
            out[d] = max([out[k] * arr.shape[k] for k in range(d + 1, arr.ndim)] or [1])
    return out


def _plain(arr) -> bool:
    """Whether the batch dimensions lie outermost-first, each matrix row- or column-major: the
    layouts oneDNN's matmul writes its fp32 result in at full speed."""
    st = _strides(arr)
    inner = sorted(st[-2:])
    if inner[0] != 1 or inner[1] < (arr.shape[-1] if st[-1] == 1 else arr.shape[-2]):
        return False
    extent = max(st[-2] * arr.shape[-2], st[-1] * arr.shape[-1])
    for d in range(arr.ndim - 3, -1, -1):
        if st[d] < extent:
            return False
        extent = st[d] * arr.shape[d]
    return True


def _readable(arr) -> bool:
    """Whether a reorder can read arr in place: every dimension longer than one steps forwards."""
    return all(s > 0 for s, n in zip(arr.strides, arr.shape) if n > 1)


def _key(arr):
    return arr.shape, arr.strides


def matmul(a, b, out, beta: float = 0.0):
    """out = a @ b (+ beta * out), multiplied in bf16 and accumulated in fp32 (check available()
    first). a (..., M, K), b (..., K, N), out (..., M, N) fp32, all with the same number of
    dimensions; a batch dimension of a or b may be 1 (broadcast). Any strides: operands are read
    in place (copied first only where one steps backwards or broadcasts by stride 0), an out the
    matmul cannot write is written through a copy."""
    a = a if _readable(a) else np.ascontiguousarray(a)
    b = b if _readable(b) else np.ascontiguousarray(b)
    if not _plain(out):
        result = matmul(a, b, np.ascontiguousarray(out) if beta else np.empty(out.shape, np.float32), beta)
        np.copyto(out, result)
        return out
    return primitive_for(a, b, out, beta)(a, b, out)


def primitive_for(a, b, out, beta: float = 0.0) -> _Product:
    """The product computing out = a @ b (+ beta out) for operands laid out as these (out plain),
    made on first use, called as product(a, b, out): what matmul runs, timed alone by llamac bench."""
    lib, engine, stream, set_threads = _state
    cache = getattr(_local, "products", None)
    if cache is None:
        cache = _local.products = {}
        _local.threads = None
    # One OpenMP thread inside a row block (the blocks already run on every core) and for a small
    # product (waking and joining a team costs more than it saves), all of them otherwise. oneDNN
    # fixes a primitive's thread count when it makes it: one primitive per count.
    flops = out.size * a.shape[-1]
    threads = 1 if cpu.in_block() or flops < cpu.MIN_MATMUL_FLOPS else cpu.n_threads()
    if threads != _local.threads and set_threads is not None:
        set_threads(threads)
        _local.threads = threads
    key = (_key(a), _key(b), _key(out), float(beta), threads)
    product = cache.get(key)
    if product is None:
        product = cache[key] = _Product(lib, engine, stream, a, b, out, beta)
    return product
