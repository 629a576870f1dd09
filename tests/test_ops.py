"""Every differentiable op against a float64 central-difference gradient, broadcasting included."""
import numpy as np
import pytest

import llamac
from llamac.engine import functional, ops
from llamac.engine.gradcheck import check_grad
from llamac.errors import DeviceError, LlamacError, ShapeError
from llamac.ops import attention, embedding, linear, rmsnorm, rope, swiglu

rng = np.random.default_rng(0)


def r(*shape, positive=False):
    x = rng.standard_normal(shape)
    return np.abs(x) + 0.5 if positive else x


BINARY = [
    ("add", lambda a, b: a + b),
    ("sub", lambda a, b: a - b),
    ("mul", lambda a, b: a * b),
    ("div", lambda a, b: a / b),
]
BROADCAST_SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((2, 1, 4), (3, 1)), ((), (2, 3))]


@pytest.mark.parametrize("name,fn", BINARY)
@pytest.mark.parametrize("sa,sb", BROADCAST_SHAPES)
def test_binary_grad_with_broadcasting(name, fn, sa, sb):
    b = r(*sb, positive=True) if name == "div" else r(*sb)
    check_grad(fn, r(*sa), b)


def test_pow_grads():
    check_grad(lambda a, b: a ** b, r(3, 4, positive=True), r(4))
    check_grad(lambda a: a ** 3, r(2, 5))
    check_grad(lambda a: a ** -1.5, r(2, 5, positive=True))
    check_grad(lambda a: 2.0 ** a, r(3))


UNARY = [
    ("neg", lambda x: -x, False),
    ("exp", functional.exp, False),
    ("log", functional.log, True),
    ("sqrt", functional.sqrt, True),
    ("rsqrt", functional.rsqrt, True),
    ("tanh", functional.tanh, False),
    ("sigmoid", functional.sigmoid, False),
    ("silu", functional.silu, False),
    ("relu", functional.relu, False),
    ("gelu", functional.gelu, False),
]


@pytest.mark.parametrize("name,fn,positive", UNARY)
def test_unary_grad(name, fn, positive):
    x = r(4, 5, positive=positive)
    if name == "relu":
        x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_grad(fn, x)


@pytest.mark.parametrize("shape,axis,keepdims", [((3, 4, 5), None, False), ((3, 4, 5), 1, False),
                                                 ((3, 4, 5), (0, 2), True), ((3, 4, 5), -1, True)])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "var"])
def test_reduction_grads(shape, axis, keepdims, reduce):
    fn = getattr(functional, reduce)
    check_grad(lambda x: fn(x, axis=axis, keepdims=keepdims), r(*shape))


def test_matmul_grads_batched_and_broadcast():
    check_grad(lambda a, b: a @ b, r(3, 4), r(4, 5))
    check_grad(lambda a, b: a @ b, r(2, 3, 4), r(2, 4, 5))
    check_grad(lambda a, b: a @ b, r(2, 3, 4), r(4, 5))          # shared weight
    check_grad(lambda a, b: a @ b, r(2, 1, 3, 4), r(3, 4, 2))    # batch broadcasting
    check_grad(lambda a, b: a @ b, r(4), r(4, 3))                 # vector @ matrix
    check_grad(lambda a, b: a @ b, r(2, 3, 4), r(4))              # matrix @ vector


def test_shape_op_grads():
    c0 = r(6, 2)
    check_grad(lambda x: x.reshape(6, 2) * c0, r(3, 4))
    c0 = r(5, 3, 4)
    check_grad(lambda x: x.permute(2, 0, 1) * c0, r(3, 4, 5))
    c0 = r(4, 3)
    check_grad(lambda x: x.transpose(0, 1) * c0, r(3, 4))
    c0 = r(2, 3, 4)
    check_grad(lambda x: x.expand(2, 3, 4) * c0, r(3, 1))
    c0 = r(2, 7)
    check_grad(lambda a, b: llamac.cat([a, b], axis=1) * c0, r(2, 3), r(2, 4))
    c0 = r(2, 2, 3)
    check_grad(lambda a, b: llamac.stack([a, b], axis=1) * c0, r(2, 3), r(2, 3))
    c0 = r(3, 3)
    check_grad(lambda x: llamac.split(x, [2, 3], axis=1)[1] * c0, r(3, 5))
    c0 = r(3, 5)
    check_grad(lambda x: functional.cumsum(x, axis=1) * c0, r(3, 5))


def test_indexing_grads_slices_and_gather_with_repeats():
    c0 = r(2, 2)
    check_grad(lambda x: x[1:, ::2] * c0, r(3, 4))
    idx = np.array([0, 2, 2, 1, 0])
    c0 = r(5, 4)
    check_grad(lambda x: x[idx] * c0, r(3, 4))               # repeated rows scatter-add
    check_grad(lambda x: x[idx, np.array([1, 1, 3, 0, 1])], r(3, 4))


def test_where_masked_fill_grads():
    cond = rng.random((3, 4)) > 0.5
    check_grad(lambda a, b: llamac.where(cond, a, b), r(3, 4), r(4))
    check_grad(lambda x: llamac.masked_fill(x, cond, -2.0), r(3, 4))


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_family_grads(axis):
    check_grad(lambda x: llamac.softmax(x, axis=axis), r(3, 5))
    check_grad(lambda x: llamac.log_softmax(x, axis=axis), r(3, 5))


def test_softmax_is_stable_for_huge_logits():
    x = llamac.tensor(np.array([[1000.0, 0.0, -1000.0]], np.float32))
    assert np.all(np.isfinite(llamac.softmax(x).numpy()))
    assert np.isfinite(llamac.log_softmax(x).numpy()).all()


def test_cross_entropy_grad_and_ignore_index():
    targets = np.array([[1, 4, -100], [0, -100, 2]])
    check_grad(lambda x: llamac.cross_entropy(x, targets), r(2, 3, 5))
    logits = r(2, 3, 5)
    loss = llamac.cross_entropy(llamac.tensor(logits, dtype="float64"), targets).item()
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = targets != -100
    want = -np.mean([lsm[i, j, targets[i, j]] for i, j in zip(*np.nonzero(valid))])
    assert abs(loss - want) < 1e-5


def test_dropout_scales_and_zeroes():
    llamac.manual_seed(0)
    x = llamac.ones(1000, 100)
    y = llamac.dropout(x, 0.3, training=True).numpy()
    assert abs((y == 0).mean() - 0.3) < 0.01
    assert np.allclose(y[y != 0], 1 / 0.7)
    assert llamac.dropout(x, 0.3, training=False) is x
    # gradient flows through the kept units only, with the same scale
    xg = llamac.tensor(r(4, 6), requires_grad=True)
    out = llamac.dropout(xg, 0.5)
    out.sum().backward()
    assert np.allclose(xg.grad, out.numpy() / np.where(xg.numpy() == 0, 1, xg.numpy()))


def test_cast_grad_flows_back_in_source_dtype():
    x = llamac.tensor(r(3, 4), dtype="float64", requires_grad=True)
    y = x.to("float32") * 2
    y.sum().backward()
    assert x.grad.dtype == np.float64 and np.allclose(x.grad, 2)


# ---------------------------------------------------------------- fused primitives

def test_linear_grad():
    check_grad(lambda x, w: linear.linear(x, w), r(2, 3, 4), r(5, 4))
    check_grad(lambda x, w, b: linear.linear(x, w, b), r(3, 4), r(5, 4), r(5))


def test_embedding_grad_with_repeated_ids():
    ids = np.array([[0, 3, 3], [1, 0, 3]])
    c0 = r(2, 3, 4)
    check_grad(lambda w: embedding.embedding(ids, w) * c0, r(5, 4))


def test_rms_norm_grad_and_value():
    x, w = r(2, 3, 8), r(8)
    check_grad(lambda x, w: rmsnorm.rms_norm(x, w, 1e-5), x, w)
    out = rmsnorm.rms_norm(llamac.tensor(x, dtype="float64"), llamac.tensor(w, dtype="float64")).numpy()
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    assert np.allclose(out, want, rtol=1e-6)


def test_rope_grad_and_rotation():
    T, hs = 5, 8
    ang = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hs, 2) / hs))[None]
    cos, sin = np.cos(ang), np.sin(ang)
    check_grad(lambda x: rope.rope(x, cos, sin), r(2, T, 3, hs))
    x = r(1, T, 1, hs)
    y = rope.rope(llamac.tensor(x, dtype="float64"), cos, sin).numpy()
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))  # rotations keep norms
    assert np.allclose(y[:, 0], x[:, 0])                                          # position 0 unrotated


def test_swiglu_grad():
    check_grad(swiglu.swiglu, r(3, 7), r(3, 7))


def _attention_reference(q, k, v, segments=None):
    B, T, H, hs = q.shape
    G = H // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hs)
    mask = np.tril(np.ones((T, T), bool))[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (4, 1)])
def test_attention_grad_gqa_and_segments(H, Hkv):
    B, T, hs = 2, 5, 4
    segments = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    check_grad(lambda q, k, v: attention.attention(q, k, v, segments), r(B, T, H, hs), r(B, T, Hkv, hs), r(B, T, Hkv, hs))
    q, k, v = r(B, T, H, hs), r(B, T, Hkv, hs), r(B, T, Hkv, hs)
    got = attention.attention(*(llamac.tensor(a, dtype="float64") for a in (q, k, v)), segments).numpy()
    assert np.allclose(got, _attention_reference(q, k, v, segments), atol=1e-10)


def test_attention_with_cache_offset_matches_full():
    B, T, H, hs = 1, 6, 2, 4
    q, k, v = r(B, T, H, hs), r(B, T, H, hs), r(B, T, H, hs)
    full = attention.attention(*(llamac.tensor(a, dtype="float64") for a in (q, k, v))).numpy()
    last = attention.attention(*(llamac.tensor(a, dtype="float64") for a in (q[:, -2:], k, v))).numpy()
    assert np.allclose(full[:, -2:], last)


# ---------------------------------------------------------------- autograd mechanics and errors

def test_grads_accumulate_into_leaves_and_no_grad_records_nothing():
    x = llamac.tensor(r(3), requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    assert np.allclose(x.grad, 5)
    with llamac.no_grad():
        y = x * 2
    assert y._ctx is None and not y.requires_grad


def test_reused_node_gets_summed_gradient_and_graph_is_freed():
    x = llamac.tensor(r(3), requires_grad=True)
    h = x * x
    y = (h + h * 2).sum()
    y.backward()
    assert np.allclose(x.grad, 6 * x.numpy())
    assert h._ctx is None and y._ctx is None   # saved arrays released after backward


def test_retain_graph_allows_second_backward():
    x = llamac.tensor(r(3), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert np.allclose(x.grad, 4 * x.numpy())


def test_clear_errors():
    a, b = llamac.tensor(r(3, 4)), llamac.tensor(r(5, 6))
    with pytest.raises(ShapeError, match=r"\(3, 4\).*\(5, 6\)"):
        a + b
    with pytest.raises(ShapeError, match=r"\(3, 4\).*\(5, 6\)"):
        a @ b
    with pytest.raises(LlamacError, match="non-scalar.*dout"):
        (llamac.tensor(r(3), requires_grad=True) * 2).backward()
    with pytest.raises(ShapeError, match="reshape"):
        a.reshape(5, 5)


class _FakeGpuArray:
    """Stands in for an array on another device: only get_array_module is consulted."""


def test_mixing_devices_names_both(monkeypatch):
    from llamac.engine import backend
    from llamac.engine import tensor as engine
    a = llamac.tensor(r(3))
    b = llamac.tensor(r(3))
    real = backend.get_array_module
    monkeypatch.setattr(backend, "get_array_module", lambda x: "cupy" if x is b.data else real(x))
    monkeypatch.setattr(backend, "device_of", lambda x: "cuda" if x is b.data else "cpu")
    with pytest.raises(DeviceError, match="cpu and cuda"):
        engine.Function.apply.__func__(ops.Add, a, b)


def test_bf16_on_cpu_stored_narrow_computed_fp32():
    x = llamac.tensor(r(4, 8), dtype="bfloat16", requires_grad=True)
    w = llamac.tensor(r(8, 3), dtype="bfloat16", requires_grad=True)
    y = x @ w
    assert y.dtype == llamac.engine.backend.bfloat16
    want = x.numpy().astype(np.float32) @ w.numpy().astype(np.float32)
    assert np.allclose(y.numpy().astype(np.float32), want, rtol=1e-2, atol=1e-2)
    y.sum().backward()
    assert x.grad.dtype == llamac.engine.backend.bfloat16 and w.grad.shape == (8, 3)


def test_factories():
    assert llamac.zeros(2, 3).shape == (2, 3) and llamac.ones((2,)).numpy().sum() == 2
    assert llamac.arange(5).tolist() == [0, 1, 2, 3, 4]
    llamac.manual_seed(1)
    a = llamac.randn(3, 3).numpy()
    llamac.manual_seed(1)
    assert np.array_equal(a, llamac.randn(3, 3).numpy())
    assert llamac.full((2,), 7.0).tolist() == [7.0, 7.0]


def test_python_scalar_operands_grads():
    check_grad(lambda x: (x + 2.5) * (3 - x) / 4 + 2 / (x * x + 1) - x * 0.5, r(3, 4))
    check_grad(lambda x: 1.5 * x - 2, r(5))


@pytest.mark.parametrize("shape", [(3, 7), (64, 3001)])   # the second is large enough for the threaded path
def test_swiglu_fp32_cpu_path_matches_float64(shape):
    gate, up = r(*shape) * 4, r(*shape)
    dout = r(*shape)
    g32 = llamac.tensor(gate.astype(np.float32), requires_grad=True)
    u32 = llamac.tensor(up.astype(np.float32), requires_grad=True)
    out = swiglu.swiglu(g32, u32)
    out.backward(dout.astype(np.float32))
    silu = gate / (1 + np.exp(-gate))
    s = 1 / (1 + np.exp(-gate))
    assert np.allclose(out.numpy(), silu * up, rtol=1e-5, atol=1e-6)
    assert np.allclose(g32.grad, dout * up * (s + silu * (1 - s)), rtol=1e-4, atol=1e-5)
    assert np.allclose(u32.grad, dout * silu, rtol=1e-5, atol=1e-6)
    big = swiglu.swiglu(llamac.tensor(np.array([-1000.0, 1000.0], np.float32)), llamac.tensor(np.ones(2, np.float32)))
    assert big.numpy().tolist() == [0.0, 1000.0]


@pytest.mark.parametrize("rows", [3, 4000])     # 4000 x 64 takes the threaded row-block path
def test_rms_norm_fp32_cpu_path_matches_float64(rows):
    x, w, dout = r(rows, 64), r(64), r(rows, 64)
    x32 = llamac.tensor(x.astype(np.float32), requires_grad=True)
    w32 = llamac.tensor(w.astype(np.float32), requires_grad=True)
    rmsnorm.rms_norm(x32, w32).backward(dout.astype(np.float32))
    x64 = llamac.tensor(x, requires_grad=True)
    w64 = llamac.tensor(w, requires_grad=True)
    out64 = rmsnorm.rms_norm(x64, w64)
    out64.backward(dout)
    assert np.allclose(rmsnorm.rms_norm(llamac.tensor(x.astype(np.float32)), w32.detach()).numpy(), out64.numpy(),
                       rtol=1e-5, atol=1e-5)
    assert np.allclose(x32.grad, x64.grad, rtol=1e-4, atol=1e-4)
    assert np.allclose(w32.grad, w64.grad, rtol=1e-4, atol=1e-3)
