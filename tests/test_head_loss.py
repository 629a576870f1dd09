"""The chunked LM head + cross-entropy (llamac.ops.cross_entropy.HeadLoss) against the plain linear + cross-entropy, in
float64 on the CPU: same loss, same gradients, whatever the chunking; the GPU test is in
tests/gpu/test_fused_step.py."""
import numpy as np
import pytest

from llamac import runtime
from llamac.engine import functional
from llamac.engine.tensor import Tensor, no_grad
from llamac.ops import linear
from llamac.ops.cross_entropy import chunk_rows, head_loss


def _case(N=37, C=12, V=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C))
    w = rng.normal(scale=0.5, size=(V, C))
    t = rng.integers(0, V, N)
    t[[0, 2, 3]] = -100                                    # ignored rows
    return x, w, t


def _backward(loss, scale):
    """loss.backward() itself (the gradient reaching the loss is the engine's unit seed) or scaled."""
    loss.backward() if scale is None else (loss * scale).backward()


def _plain(x, w, t, scale):
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    loss = functional.cross_entropy(linear.linear(xt, wt), Tensor(t))
    _backward(loss, scale)
    return float(loss.data), xt.grad, wt.grad


@pytest.mark.parametrize("chunk_bytes", [1, 10 ** 9])   # 128-row chunks (the floor: 128 + 2 rows), one chunk
@pytest.mark.parametrize("scale", [None, 1.0, 0.25])
def test_head_loss_equals_linear_then_cross_entropy(chunk_bytes, scale):
    x, w, t = _case()
    x = np.concatenate([x] * 4)[:130]                      # 130 rows: past the 128-row floor
    t = np.concatenate([t] * 4)[:130]
    want_loss, want_gx, want_gw = _plain(x, w, t, scale)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    loss = head_loss(xt, wt, t, chunk_bytes=chunk_bytes)
    _backward(loss, scale)
    assert abs(float(loss.data) - want_loss) <= 1e-12 * abs(want_loss)
    np.testing.assert_allclose(xt.grad, want_gx, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(wt.grad, want_gw, rtol=1e-10, atol=1e-14)


def test_head_loss_batch_shape_and_frozen_operands():
    x, w, t = _case(N=24)
    x3, t3 = x.reshape(2, 12, -1), t.reshape(2, 12)
    want_loss, want_gx, _ = _plain(x, w, t, 1.0)
    xt = Tensor(x3, requires_grad=True)
    loss = head_loss(xt, Tensor(w), t3)                    # a frozen head: only dX is made
    loss.backward()
    assert xt.grad.shape == (2, 12, x.shape[1])
    np.testing.assert_allclose(xt.grad.reshape(x.shape), want_gx, rtol=1e-10, atol=1e-14)
    with no_grad():
        assert abs(float(head_loss(Tensor(x3), Tensor(w), t3).data) - want_loss) <= 1e-12 * want_loss


def test_every_row_ignored_gives_zero_loss_and_gradient():
    x, w, t = _case(N=6)
    t[:] = -100
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    loss = head_loss(xt, wt, t)
    loss.backward()
    assert float(loss.data) == 0.0 and not xt.grad.any() and not wt.grad.any()


def test_chunk_rows():
    assert chunk_rows(32000, 2) == runtime.options().head_loss_chunk_bytes // 64000 and chunk_rows(32000, 2, 64000 * 300) == 300
    assert chunk_rows(10 ** 9, 2) == 128                   # never below a tensor-core-sized GEMM


@pytest.mark.parametrize("chunk_bytes", [1, 10 ** 9])
@pytest.mark.parametrize("head_trains", [False, True])
def test_head_loss_with_token_rows_equals_linear_with_rows_then_cross_entropy(chunk_bytes, head_trains):
    """LoRA's trainable token rows: logit columns `index` from rows (k, C) instead of the head's rows;
    only (k, C) gradients for the rows, the head's gradient (if it trains) without those columns."""
    from llamac.ops.lora import linear_with_rows
    x, w, t = _case()
    x, t = np.concatenate([x] * 4)[:130], np.concatenate([t] * 4)[:130]
    index = np.array([3, 7, 8])
    t[1::9] = 7                                            # rows' tokens as targets too
    rows = np.random.default_rng(1).normal(size=(3, x.shape[1]))
    results = []
    for fused in (True, False):
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=head_trains)
        rt = Tensor(rows, requires_grad=True)
        if fused:
            loss = head_loss(xt, wt, t, chunk_bytes=chunk_bytes, rows=rt, index=index)
        else:
            loss = functional.cross_entropy(linear_with_rows(xt, wt, rt, index), Tensor(t))
        _backward(loss, 0.5)
        results.append((float(loss.data), xt.grad, rt.grad, wt.grad))
    (loss, gx, grows, gw), (want_loss, want_gx, want_grows, want_gw) = results
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grows, want_grows, rtol=1e-10, atol=1e-14)
    assert (gw is None) == (not head_trains)
    if head_trains:
        np.testing.assert_allclose(gw, want_gw, rtol=1e-10, atol=1e-14)
        assert not gw[index].any()                         # those logits never read the head's own rows
    # and linear_with_rows is the plain head on the weight with the rows in place
    merged = w.copy()
    merged[index] = rows
    want = functional.cross_entropy(linear.linear(Tensor(x), Tensor(merged)), Tensor(t))
    assert abs(float(want.data) - want_loss) <= 1e-12 * abs(want_loss)
