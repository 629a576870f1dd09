"""bf16 matrix products on the CPU: oneDNN's matmul through ctypes (the `cpu-bf16` extra).

Products take fp32 operands, multiply them in bf16 and accumulate and write fp32: oneDNN's
"bf16 fpmath mode", where the operands are rounded to bf16 as they are packed into the
AVX512-BF16 / AMX tiles, so no bf16 copy of an activation or a weight is ever written. Operands
are read in place through their strides (transposed matrices, a batch dimension of 1 broadcast);
one whose batch dimensions do not lie outermost-first is copied first (oneDNN would take an fp32
GEMM for it). One primitive per (shapes, strides, beta, thread count) and thread, made on first use.

Only where the processor multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo)
and the library loads; `unavailable()` says why not otherwise."""
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
_F32 = 3                                # dnnl_data_type_t
_CPU = 1                                # dnnl_engine_kind_t
_FPMATH_BF16 = 1
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
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
                       ("dnnl_primitive_attr_set_fpmath_mode", [p, ctypes.c_int]),
                       ("dnnl_primitive_attr_set_post_ops", [p, p]),
                       ("dnnl_post_ops_create", [ctypes.POINTER(p)]),
                       ("dnnl_post_ops_destroy", [p]),
                       ("dnnl_post_ops_append_sum", [p, ctypes.c_float, ctypes.c_int32, ctypes.c_int]),
                       ("dnnl_matmul_primitive_desc_create", [ctypes.POINTER(p), p, p, p, p, p, p]),
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
    _state = (lib, engine, stream, set_threads)
    return _state


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


class _Product:
    """One matmul primitive and its three memory objects, whose data handles change per call."""

    def __init__(self, lib, engine, a, b, out, beta):
        p = ctypes.c_void_p
        descs = []
        for arr in (a, b, out):
            md = p()
            n = arr.ndim
            _check(lib.dnnl_memory_desc_create_with_strides(
                ctypes.byref(md), n, _Dims(*arr.shape), _F32, _Dims(*_strides(arr))), "memory_desc")
            descs.append(md)
        attr = p()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attr")
        post = None
        try:
            _check(lib.dnnl_primitive_attr_set_fpmath_mode(attr, _FPMATH_BF16), "fpmath mode")
            if beta:
                post = p()
                _check(lib.dnnl_post_ops_create(ctypes.byref(post)), "post_ops")
                _check(lib.dnnl_post_ops_append_sum(post, float(beta), 0, 0), "sum post-op")
                _check(lib.dnnl_primitive_attr_set_post_ops(attr, post), "post_ops")
            pd, prim = p(), p()
            _check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), engine, descs[0], descs[1], None,
                                                         descs[2], attr), "matmul descriptor")
            try:
                _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "matmul primitive")
            finally:
                lib.dnnl_primitive_desc_destroy(pd)
            self.memories = []
            for md in descs:
                mem = p()
                _check(lib.dnnl_memory_create(ctypes.byref(mem), md, engine, None), "memory")
                self.memories.append(mem)
        finally:
            if post is not None:
                lib.dnnl_post_ops_destroy(post)
            lib.dnnl_primitive_attr_destroy(attr)
            for md in descs:
                lib.dnnl_memory_desc_destroy(md)
        self.primitive = prim
        self.args = (_ExecArg * 3)(*(_ExecArg(k, m) for k, m in zip((_ARG_SRC, _ARG_WEIGHTS, _ARG_DST),
                                                                     self.memories)))

    def __call__(self, lib, stream, a, b, out):
        for mem, arr in zip(self.memories, (a, b, out)):
            lib.dnnl_memory_set_data_handle(mem, arr.ctypes.data)
        _check(lib.dnnl_primitive_execute(self.primitive, stream, 3, self.args), "matmul")
        lib.dnnl_stream_wait(stream)


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
    layouts oneDNN's AMX / AVX512-BF16 kernels read (others fall to an fp32 GEMM)."""
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


def _key(arr):
    return arr.shape, arr.strides


def matmul(a, b, out, beta: float = 0.0):
    """out = a @ b (+ beta * out), multiplied in bf16 and accumulated in fp32 (check available()
    first). a (..., M, K), b (..., K, N), out (..., M, N) fp32, all with the same number of
    dimensions; a batch dimension of a or b may be 1 (broadcast). Any strides: an operand in a
    layout the bf16 kernels do not read is copied first, an out of one is written through a copy."""
    a = a if _plain(a) else np.ascontiguousarray(a)
    b = b if _plain(b) else np.ascontiguousarray(b)
    if not _plain(out):
        result = matmul(a, b, np.ascontiguousarray(out) if beta else np.empty(out.shape, np.float32), beta)
        np.copyto(out, result)
        return out
    primitive_for(a, b, out, beta)(a, b, out)
    return out


def primitive_for(a, b, out, beta: float = 0.0):
    """The primitive computing out = a @ b (+ beta out) for operands laid out as these (plain
    layouts), made on first use, as a function of (a, b, out): what matmul runs, timed alone by
    llamac bench."""
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
        product = cache[key] = _Product(lib, engine, a, b, out, beta)
    return lambda a, b, out: product(lib, stream, a, b, out)
