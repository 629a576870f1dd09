"""Every differentiable primitive against a float64 central-difference gradient, broadcasting included,
and the autograd engine's mechanics and errors. The fused ops (linear, embedding, RMSNorm, RoPE, SwiGLU,
cross-entropy, attention) are checked on both backends from the tables of tests/op_cases.py."""
import numpy as np
import pytest

import llamac
from llamac.engine import functional, ops
from llamac.engine.gradcheck import check_grad
from llamac.errors import DeviceError, LlamacError, ShapeError

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


def test_the_graph_does_not_keep_an_intermediate_no_backward_reads():
    """x * w saves x and w, and x + h reads no array in its backward: once the caller drops h, its
    array is freed before the backward (the graph holds h's producer and shape only), and the
    gradients are the same."""
    import weakref
    x = llamac.tensor(r(3), requires_grad=True)
    w = llamac.tensor(r(3) + 2, requires_grad=True)
    h = x * w
    kept = weakref.ref(h.data)
    y = (h + x).sum()
    del h
    assert kept() is None
    y.backward()
    assert np.allclose(x.grad, w.numpy() + 1) and np.allclose(w.grad, x.numpy())


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


@pytest.mark.parametrize("op", ["mul", "rmul", "add", "radd", "sub", "rsub", "div"])
def test_scalar_ops_keep_bf16(op):
    """bf16 op Python float stays bf16 (not left to the array library's promotion rules)."""
    x = llamac.tensor(np.array([1.0, 2.0, 3.0], np.float32)).to("bfloat16")
    out = {"mul": lambda: x * 0.5, "rmul": lambda: 0.5 * x, "add": lambda: x + 0.5, "radd": lambda: 0.5 + x,
           "sub": lambda: x - 0.5, "rsub": lambda: 0.5 - x, "div": lambda: x / 2.0}[op]()
    assert out.dtype == llamac.engine.backend.bfloat16
    want = {"mul": [0.5, 1, 1.5], "rmul": [0.5, 1, 1.5], "add": [1.5, 2.5, 3.5], "radd": [1.5, 2.5, 3.5],
            "sub": [0.5, 1.5, 2.5], "rsub": [-0.5, -1.5, -2.5], "div": [0.5, 1, 1.5]}[op]
    assert np.array_equal(out.numpy().astype(np.float32), np.array(want, np.float32))
