"""cublas.gemm (cuBLAS through ctypes) against float64 NumPy: fp32/bf16/fp16, 2-D and batched, transposes,
strided views, broadcasting, awkward sizes, beta accumulation, and recording inside a CUDA graph."""
import numpy as np
import pytest

from llamac.engine import backend, cublas, matmul
from llamac.ops import linear


rng = np.random.default_rng(0)
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
SIZES = [(1, 1, 1), (1, 37, 1), (5, 1, 3), (17, 33, 65), (129, 7, 255), (64, 128, 96), (300, 1000, 3)]


def _rel(got, want):
    got = backend.to_numpy(got).astype(np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _on_gpu(x, dtype):
    cp = backend.cupy_module()
    return cp.asarray(np.asarray(x, np.float32)).astype(backend.as_dtype(dtype))


def _exact(x, dtype):
    """The float64 values the GPU actually holds after rounding to dtype."""
    return backend.to_numpy(_on_gpu(x, dtype).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M,K,N", SIZES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_2d_matches_float64(dtype, M, K, N, ta, tb):
    a = rng.standard_normal((K, M) if ta else (M, K))
    b = rng.standard_normal((N, K) if tb else (K, N))
    got = cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype), trans_a=ta, trans_b=tb)
    A, B = _exact(a, dtype), _exact(b, dtype)
    want = (A.T if ta else A) @ (B.T if tb else B)
    assert got.shape == (M, N) and got.dtype == backend.as_dtype(dtype)
    assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("a_shape,b_shape", [
    ((3, 5, 7), (3, 7, 9)), ((4, 1, 13), (4, 13, 1)), ((2, 3, 17, 33), (2, 3, 33, 5)),
    ((2, 1, 6, 8), (1, 3, 8, 4)),          # broadcast batch dims
    ((5, 6, 8), (8, 4)),                   # a shared matrix: folded into one GEMM
    ((6, 8), (5, 8, 4)),                   # a shared left operand: batch stride 0
])
def test_gemm_batched_matches_float64(dtype, a_shape, b_shape):
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    got = cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype))
    want = np.matmul(_exact(a, dtype), _exact(b, dtype))
    assert got.shape == want.shape
    assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_reads_attention_layouts_in_place_and_broadcast_heads(dtype):
    B, T, Tk, Hkv, G, hs = 2, 19, 23, 2, 3, 16
    q = _on_gpu(rng.standard_normal((B, T, Hkv * G, hs)), dtype)
    k = _on_gpu(rng.standard_normal((B, Tk, Hkv, hs)), dtype)
    qg = q.reshape(B, T, Hkv, G, hs).transpose(0, 2, 3, 1, 4)        # (B, Hkv, G, T, hs) strided view
    kt = k.transpose(0, 2, 3, 1)[:, :, None]                          # (B, Hkv, 1, hs, Tk), broadcast over G
    got = matmul.matmul(qg, kt)
    want = np.matmul(backend.to_numpy(qg.astype(np.float32)).astype(np.float64),
                     backend.to_numpy(kt.astype(np.float32)).astype(np.float64))
    assert got.shape == (B, Hkv, G, T, Tk)
    assert _rel(got, want) <= TOL[dtype]
    # columns sliced out of a wider matrix (ld > cols) and reversed rows (copied first)
    cp = backend.cupy_module()
    wide = _on_gpu(rng.standard_normal((33, 50)), dtype)
    rhs = _on_gpu(rng.standard_normal((40, 9)), dtype)
    for lhs in (wide[:, 5:45], wide[::-1, :40], wide[:, ::-1][:, :40]):
        want = backend.to_numpy(lhs.astype(np.float32)).astype(np.float64) @ \
            backend.to_numpy(rhs.astype(np.float32)).astype(np.float64)
        assert _rel(matmul.matmul(lhs, rhs), want) <= TOL[dtype]
    assert cp.isfinite(got).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_beta_accumulates_into_out(dtype):
    a, b, c = rng.standard_normal((31, 17)), rng.standard_normal((31, 45)), rng.standard_normal((17, 45))
    out = _on_gpu(c, dtype)
    cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype), out=out, trans_a=True, beta=1.0, alpha=0.5)
    want = 0.5 * _exact(a, dtype).T @ _exact(b, dtype) + _exact(c, dtype)
    assert _rel(out, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gemm_16_bit_inputs_sum_into_a_float32_out(dtype):
    # The chunked LM head's weight gradient: many products summed in fp32, rounded never in between.
    cp = backend.cupy_module()
    parts = [(rng.standard_normal((64, 40)), rng.standard_normal((64, 24))) for _ in range(6)]
    out = cp.zeros((40, 24), np.float32)
    for a, b in parts:
        cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype), out=out, trans_a=True, beta=1.0)
    want = sum(_exact(a, dtype).T @ _exact(b, dtype) for a, b in parts)
    assert out.dtype == np.float32 and _rel(out, want) <= 1e-6
    with pytest.raises(Exception, match="float32 for 16-bit inputs"):
        cublas.gemm(_on_gpu(parts[0][0], "float32"), _on_gpu(parts[0][1], "float32"),
                     out=cp.zeros((40, 24), np.float16), trans_a=True)


def test_matmul_vectors_float64_and_integers_still_work():
    cp = backend.cupy_module()
    a, b = rng.standard_normal((4, 6)), rng.standard_normal(6)
    assert np.allclose(backend.to_numpy(matmul.matmul(cp.asarray(a), cp.asarray(b))), a @ b)
    assert np.allclose(backend.to_numpy(matmul.matmul(cp.asarray(b), cp.asarray(a.T))), b @ a.T)
    ints = np.arange(12).reshape(3, 4)
    assert (backend.to_numpy(matmul.matmul(cp.asarray(ints), cp.asarray(ints.T))) == ints @ ints.T).all()


def test_gemm_records_inside_a_cuda_graph_and_replays():
    cp = backend.cupy_module()
    a = _on_gpu(rng.standard_normal((3, 64, 48)), "bfloat16")
    b = _on_gpu(rng.standard_normal((3, 48, 80)), "bfloat16")
    pool = backend.new_graph_pool()
    graph, out = backend.capture_graph(lambda: matmul.matmul(a, b) * 2, pool)
    a[...] = _on_gpu(rng.standard_normal((3, 64, 48)), "bfloat16")       # new inputs, same buffers
    graph.launch()
    backend.synchronize()
    want = 2 * np.matmul(backend.to_numpy(a.astype(np.float32)).astype(np.float64),
                         backend.to_numpy(b.astype(np.float32)).astype(np.float64))
    assert _rel(out, want) <= 1e-2
    assert cp.isfinite(out).all()


def test_linear_weight_gradient_accumulates_in_place():
    import llamac
    from llamac.model.layers import Parameter
    cp = backend.cupy_module()
    x = llamac.Tensor(cp.asarray(rng.standard_normal((2, 5, 8)), dtype=np.float32))
    w = Parameter(cp.asarray(rng.standard_normal((6, 8)), dtype=np.float32))
    linear.linear(x, w).sum().backward()
    first = w.grad
    linear.linear(x, w).sum().backward()
    assert w.grad is first                          # added inside the GEMM, not a new array
    want = 2 * np.ones((10, 6)).T @ backend.to_numpy(x.data).reshape(10, 8)
    assert np.allclose(backend.to_numpy(w.grad), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- cuBLASLt, the algorithm timed per shape

def _lt():
    return cublas._cublas().lt()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True)])
def test_tuned_gemm_matches_float64_and_beta_survives_the_timing(dtype, ta, tb):
    """Shapes big enough to be timed (llamac.engine.cublaslt): the chosen algorithm gives the product, and
    timing the candidates on a scratch buffer leaves a beta=1 accumulation target untouched."""
    from llamac.engine import cublaslt
    lt = _lt()
    if lt is None:
        pytest.skip("no cuBLASLt beside libcublas")
    M, K, N = 2048 + 64 * ta + 128 * tb, 1024, 1536
    assert 2.0 * M * N * K >= cublaslt.TUNE_MIN_FLOPS
    a = rng.standard_normal((K, M) if ta else (M, K))
    b = rng.standard_normal((N, K) if tb else (K, N))
    c = rng.standard_normal((M, N))
    before = cublaslt.tuned_algorithms(lt)
    out = _on_gpu(c, dtype)
    cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype), out=out, trans_a=ta, trans_b=tb, beta=1.0)
    assert cublaslt.tuned_algorithms(lt) == before + 1          # a new shape: timed once
    A, B = _exact(a, dtype), _exact(b, dtype)
    want = (A.T if ta else A) @ (B.T if tb else B) + _exact(c, dtype)
    assert _rel(out, want) <= TOL[dtype]
    again = cublas.gemm(_on_gpu(a, dtype), _on_gpu(b, dtype), trans_a=ta, trans_b=tb)
    assert cublaslt.tuned_algorithms(lt) == before + 1          # the same shape: the kept choice
    assert _rel(again, want - _exact(c, dtype)) <= TOL[dtype]


def test_untuned_shape_inside_a_capture_and_unaligned_operands_still_compute():
    """A shape first seen while a CUDA graph records takes the heuristic's first algorithm (no
    timing may run then); an operand off cuBLASLt's 256-byte alignment goes to cublasGemmEx."""
    cp = backend.cupy_module()
    a_host, b_host = rng.standard_normal((1031, 1024)), rng.standard_normal((1024, 1040))
    a, b = _on_gpu(a_host, "bfloat16"), _on_gpu(b_host, "bfloat16")
    out = cp.empty((1031, 1040), backend.bfloat16)
    pool = backend.new_graph_pool()
    graph, _ = backend.capture_graph(lambda: cublas.gemm(a, b, out=out), pool)
    out[...] = 0
    graph.launch()
    want = _exact(a_host, "bfloat16") @ _exact(b_host, "bfloat16")
    assert _rel(out, want) <= TOL["bfloat16"]
    big = _on_gpu(rng.standard_normal((1032, 1024)), "bfloat16")
    view = big[1:]                                              # starts 2048 bytes in: 256-aligned
    odd = _on_gpu(rng.standard_normal((1024 * 1033 + 8,)), "bfloat16")[8:].reshape(1033, 1024)  # 16 bytes in
    for x in (view, odd):
        got = cublas.gemm(x, b)
        want = backend.to_numpy(x.astype(np.float32)).astype(np.float64) @ _exact(b_host, "bfloat16")
        assert _rel(got, want) <= TOL["bfloat16"]
