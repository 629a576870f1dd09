"""cuBLASLt through ctypes: each GEMM shape runs the fastest of the algorithms cuBLASLt proposes.

cublasGemmEx runs the first algorithm of cuBLAS's heuristic. For the training GEMMs that choice is
often slower than another of the heuristic's top eight (the narrow projections and the down
projection's input gradient most; numbers in BENCHMARKS.md). Here the
candidates are timed once per shape, on scratch output buffers, the first time the shape runs
outside a CUDA-graph capture; the winner is kept for the process, so a captured graph and every
later call run the same algorithm (results are reproducible within a process, not across them).

Used by cublas.gemm for single (unbatched) 16-bit GEMMs; everything else stays on cublasGemmEx.
Nothing here imports cupy: backend hands it out.
"""
from __future__ import annotations

import ctypes
import os

from llamac.errors import LlamacError

CANDIDATES = 8                  # heuristic results timed per shape
TUNE_MAX_OUT_BYTES = 256 << 20  # larger outputs (the LM head's logits) take the first candidate:
                                # no second buffer of that size is allocated to time the others
TUNE_MIN_FLOPS = 2e9            # smaller products (decode, short prefills: a new shape per prompt
                                # length) take the first candidate: timing would cost more than it saves
_ALIGN = 256                    # cuBLASLt's default minimum operand alignment in its heuristic

_DESC_TRANSA, _DESC_TRANSB = 3, 4               # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE_BYTES = 1                   # cublasLtMatmulPreferenceAttributes_t
_COMPUTE_32F, _R_32F = 68, 0


class _Heuristic(ctypes.Structure):               # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class _Plan:
    """One GEMM shape's descriptors and chosen algorithm (kept alive with the plan)."""

    __slots__ = ("desc", "a", "b", "c", "algo", "tuned")


class CublasLt:
    def __init__(self, cublas_path: str, cp, workspace):
        name = os.path.basename(cublas_path).replace("libcublas", "libcublasLt")
        path = os.path.join(os.path.dirname(cublas_path), name)
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise LlamacError(f"cannot load cuBLASLt ({path}): {exc}") from None
        vp, i32, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        lib.cublasLtCreate.argtypes = [ctypes.POINTER(vp)]
        lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(vp), i32, i32]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, i32, vp, size]
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(vp), i32, u64, u64, i64]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(vp)]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, i32, vp, size]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, i32, ctypes.POINTER(_Heuristic),
                                                       ctypes.POINTER(i32)]
        lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, size, vp]
        self.lib, self.cp, self.workspace = lib, cp, workspace
        self.handle = vp()
        self._check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.pref = vp()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "cublasLtMatmulPreferenceCreate")
        ws = ctypes.c_uint64(workspace.nbytes)
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
                    "cublasLtMatmulPreferenceSetAttribute")
        self.plans: dict = {}

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise LlamacError(f"{what} failed with cuBLAS status {status}")

    def _layout(self, dtype_code, rows, cols, ld):
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype_code, rows, cols, ld),
                    "cublasLtMatrixLayoutCreate")
        return layout

    def _plan(self, key):
        """Descriptors and heuristic candidates for key = (type, out type, op_a, op_b, m, n, k, lda, ldb, ldc)."""
        t, t_out, op_a, op_b, m, n, k, lda, ldb, ldc = key
        plan = _Plan()
        plan.desc = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(plan.desc), _COMPUTE_32F, _R_32F),
                    "cublasLtMatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, op_a), (_DESC_TRANSB, op_b)):
            value = ctypes.c_int(op)
            self._check(self.lib.cublasLtMatmulDescSetAttribute(plan.desc, attr, ctypes.byref(value), 4),
                        "cublasLtMatmulDescSetAttribute")
        # Column-major storage of the operands before their ops: A is m x k (k x m when transposed).
        plan.a = self._layout(t, *((m, k) if op_a == 0 else (k, m)), lda)
        plan.b = self._layout(t, *((k, n) if op_b == 0 else (n, k)), ldb)
        plan.c = self._layout(t_out, m, n, ldc)
        found = (_Heuristic * CANDIDATES)()
        count = ctypes.c_int()
        self._check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c,
                                                            self.pref, CANDIDATES, found, ctypes.byref(count)),
                    "cublasLtMatmulAlgoGetHeuristic")
        candidates = [found[i] for i in range(count.value) if found[i].state == 0]
        if not candidates:
            return None
        plan.algo, plan.tuned = candidates[0].algo, False
        return plan, candidates

    def _run(self, plan, algo, alpha, a_ptr, b_ptr, beta, c_ptr, stream):
        self._check(self.lib.cublasLtMatmul(self.handle, plan.desc, alpha, a_ptr, plan.a, b_ptr, plan.b, beta,
                                            c_ptr, plan.c, c_ptr, plan.c, ctypes.byref(algo), self.workspace.data.ptr,
                                            self.workspace.nbytes, stream), "cublasLtMatmul")

    def _tune(self, plan, candidates, alpha, a_ptr, b_ptr, beta, out, stream_obj):
        """The fastest candidate, timed on a scratch output (beta != 0 would otherwise accumulate)."""
        cp = self.cp
        scratch = cp.empty_like(out)
        best, best_ms = plan.algo, float("inf")
        start, end = cp.cuda.Event(), cp.cuda.Event()
        for cand in candidates:
            try:
                for _ in range(2):
                    self._run(plan, cand.algo, alpha, a_ptr, b_ptr, beta, scratch.data.ptr, stream_obj.ptr)
                start.record(stream_obj)
                for _ in range(5):
                    self._run(plan, cand.algo, alpha, a_ptr, b_ptr, beta, scratch.data.ptr, stream_obj.ptr)
                end.record(stream_obj)
                end.synchronize()
            except LlamacError:
                continue
            ms = cp.cuda.get_elapsed_time(start, end)
            if ms < best_ms:
                best, best_ms = cand.algo, ms
        plan.algo, plan.tuned = best, True

    def matmul(self, key, alpha, a_ptr, b_ptr, beta, out) -> bool:
        """C = alpha op(A) op(B) + beta C in column-major terms (out is C). False when cuBLASLt
        has no algorithm for it (the caller then uses cublasGemmEx)."""
        if any(p % _ALIGN for p in (a_ptr, b_ptr, out.data.ptr)):
            return False
        entry = self.plans.get(key)
        if entry is None:
            entry = self.plans[key] = self._plan(key)
        if entry is None:
            return False
        plan, candidates = entry
        stream = self.cp.cuda.get_current_stream()
        t, t_out, op_a, op_b, m, n, k = key[:7]
        if (not plan.tuned and len(candidates) > 1 and 2.0 * m * n * k >= TUNE_MIN_FLOPS
                and out.nbytes <= TUNE_MAX_OUT_BYTES and not stream.is_capturing()):
            self._tune(plan, candidates, alpha, a_ptr, b_ptr, beta, out, stream)
        self._run(plan, plan.algo, alpha, a_ptr, b_ptr, beta, out.data.ptr, stream.ptr)
        return True


def tuned_algorithms(lt: CublasLt) -> int:
    """How many shapes have a timed choice (tests)."""
    return sum(1 for entry in lt.plans.values() if entry is not None and entry[0].tuned)

