"""The threaded CPU paths (llamac/engine/cpu.py and the fused CPU code that uses it) at sizes large enough to
split over threads, against float64 computed on one thread or written out plainly."""
import numpy as np
import pytest

import llamac
from llamac.engine import cpu, ops
from llamac.ops import attention, linear, rope

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


@pytest.fixture
def one_thread(monkeypatch):
    """Run the float64 reference inline (no threads)."""
    def use():
        monkeypatch.setattr(cpu, "MIN_ELEMENTS", 1 << 62)
        monkeypatch.setattr(cpu, "MIN_MATMUL_FLOPS", 1 << 62)
    return use


def _attention_grads(q, k, v, segments, dout, dtype):
    ts = [llamac.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v)]
    out = attention.attention(*ts, segments)
    out.backward(dout.astype(dtype))
    return [out.numpy()] + [t.grad for t in ts]


@pytest.mark.parametrize("Tq,Tk,segmented", [(64, 64, False), (64, 64, True), (24, 64, False)])
def test_threaded_attention_matches_float64(Tq, Tk, segmented, one_thread):
    B, H, Hkv, hs = 12, 8, 2, 16              # B x H x Tq x Tk above cpu.MIN_ELEMENTS: the threaded path
    q, k, v, dout = r(B, Tq, H, hs), r(B, Tk, Hkv, hs), r(B, Tk, Hkv, hs), r(B, Tq, H, hs)
    segments = np.sort(rng.integers(0, 3, (B, Tk)), axis=1) if segmented else None
    got = _attention_grads(q, k, v, segments, dout, "float32")
    one_thread()
    want = _attention_grads(q, k, v, segments, dout, "float64")
    for g, w in zip(got, want):
        assert np.allclose(g, w, rtol=1e-4, atol=1e-4)


def test_threaded_cross_entropy_matches_float64(one_thread):
    N, V = 300, 2000
    logits, targets = r(N, V) * 3, rng.integers(0, V, N)
    targets[::7] = -100
    lsm = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    valid = targets != -100
    want_loss = -lsm[np.nonzero(valid)[0], targets[valid]].mean()
    want_grad = np.exp(lsm)
    want_grad[np.nonzero(valid)[0], targets[valid]] -= 1
    want_grad *= valid[:, None] / valid.sum() * 0.5
    x = llamac.tensor(logits.astype(np.float32), requires_grad=True)
    loss = llamac.cross_entropy(x, targets)
    (loss * 0.5).backward()
    assert abs(loss.item() - want_loss) < 1e-5
    assert np.allclose(x.grad, want_grad, atol=1e-7)


def test_threaded_rope_matches_pairwise_formula():
    B, T, H, hs = 16, 64, 4, 32               # B T H hs = cpu.MIN_ELEMENTS: the threaded path
    x = r(B, T, H, hs).astype(np.float32)
    ang = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hs, 2) / hs))[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    want = np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)
    t = llamac.tensor(x, requires_grad=True)
    out = rope.rope(t, cos, sin)
    assert np.allclose(out.numpy(), want, atol=1e-5)
    out.backward(out.numpy())                                   # rotating back gives x
    assert np.allclose(t.grad, x, atol=1e-5)


@pytest.mark.parametrize("shape_a,shape_b", [((700, 300), (300, 90)), ((90, 300), (300, 700)),
                                             ((3, 5), (5, 2)), ((2000, 64), (64, 1)),
                                             ((64, 3000), (3000, 50))])      # split over the inner dimension
def test_threaded_matmul_matches_numpy(shape_a, shape_b):
    a, b = r(*shape_a).astype(np.float32), r(*shape_b).astype(np.float32)
    assert np.allclose(cpu.matmul(a, b), a @ b, rtol=1e-4, atol=1e-4)
    assert np.allclose(cpu.matmul(b.T, a.T), b.T @ a.T, rtol=1e-4, atol=1e-4)     # transposed views


@pytest.mark.parametrize("shape_a,shape_b", [((700, 300), (300, 90)), ((3, 5), (5, 2)), ((64, 3000), (3000, 50)),
                                             ((2048, 704), (704, 256))])
@pytest.mark.parametrize("threads", [True, False])
def test_matmul_adds_into_out_inside_the_gemm(shape_a, shape_b, threads, one_thread):
    """beta=1: out += a @ b through OpenBLAS's sgemm where it reads the operands as they lie
    (C order or transposed), row blocks of out per thread; the same sum otherwise."""
    if not threads:
        one_thread()
    a, b = r(*shape_a).astype(np.float32), r(*shape_b).astype(np.float32)
    big = r(shape_a[0] + 2, shape_b[1]).astype(np.float32)
    for A in (a, np.asfortranarray(a)):
        for B in (b, np.asfortranarray(b)):
            out = big.copy()
            block = out[1:-1]                                   # a row block: its row stride is the ld
            got = cpu.matmul(A, B, out=block, beta=1.0)
            assert got is block
            want = big[1:-1].astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
            assert np.abs(block - want).max() <= 1e-5 * np.abs(want).max()
            assert np.array_equal(out[0], big[0]) and np.array_equal(out[-1], big[-1])   # untouched
    if cpu.sgemm_takes(a, b, big[1:-1]):
        assert cpu._sgemm_fn, "sgemm_takes said yes without an sgemm"
    # what sgemm cannot read in place goes through NumPy, with the same result
    assert not cpu.sgemm_takes(a[:, ::2], b[::2], big[1:-1]) and not cpu.sgemm_takes(a.astype(np.float64), b, big)
    out = big.copy()
    cpu.matmul(a[:, ::2], b[::2], out=out[1:-1], beta=1.0)
    want = big[1:-1].astype(np.float64) + a[:, ::2].astype(np.float64) @ b[::2].astype(np.float64)
    assert np.abs(out[1:-1] - want).max() <= 1e-5 * np.abs(want).max()


def test_projection_input_gradients_summed_in_the_gemm_equal_separate_ones(monkeypatch):
    """linear.linears on the CPU (float32): the q, k, v (and gate, up) projections add their input
    gradients into one array inside the GEMMs; the sums equal the engine's separate adds."""
    x0 = r(4, 33, 64).astype(np.float32)
    ws0 = [r(n, 64).astype(np.float32) * 0.1 for n in (64, 32, 32)]
    grads = []
    for in_gemm in (True, False):
        monkeypatch.setattr(linear, "_sums_in_gemm", lambda x, v=in_gemm: v)
        x = llamac.tensor(x0, requires_grad=True)
        ws = [llamac.tensor(w, requires_grad=True) for w in ws0]
        outs = linear.linears(x, ws)
        sum((o * o).sum() for o in outs).backward()
        grads.append([x.grad] + [w.grad for w in ws])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_blas_thread_count_is_restored():
    cpu._blas_threads(None)                                     # finds the library
    if not cpu._blas_api:
        pytest.skip("NumPy is not linked to OpenBLAS here")
    before = cpu._blas_api[1]()
    cpu.matmul(np.ones((800, 800), np.float32), np.ones((800, 800), np.float32))
    cpu.matmul(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32))
    assert cpu._blas_api[1]() == before


def test_nested_row_blocks_run_inline():
    seen = []

    def inner(a, b):
        seen.append((a, b))

    def outer(a, b):
        cpu.for_row_blocks(inner, 10, 1 << 30)

    cpu.for_row_blocks(outer, 4, 1 << 30)
    assert sorted(seen) == [(0, 10)] * min(cpu.n_threads(), 4)


def test_threaded_add_and_embedding_scatter():
    a, b = r(600, 300).astype(np.float32), r(600, 300).astype(np.float32)   # above cpu.MIN_ELEMENTS
    ta, tb = llamac.tensor(a, requires_grad=True), llamac.tensor(b, requires_grad=True)
    out = ta + tb
    assert np.array_equal(out.numpy(), a + b)
    out.backward(np.ones_like(a))
    assert np.array_equal(ta.grad, np.ones_like(a)) and np.array_equal(tb.grad, np.ones_like(b))
    ids, g = rng.integers(-50, 50, 3000), r(3000, 7)
    want = np.zeros((50, 7))
    np.add.at(want, ids, g)
    assert np.allclose(ops.scatter_add(np, (50, 7), ids, g), want)


def test_matmul_inside_a_block_does_not_deadlock():
    a = np.ones((300, 300), np.float32)
    got = {}

    def fn(i, j):
        got[i] = cpu.matmul(a[:10], a)[0, 0] + cpu.matmul(a, a)[0, 0]

    cpu.for_row_blocks(fn, 4, 1 << 30)
    assert set(got.values()) == {600.0}
