"""The GPU training fusions' bookkeeping, run on NumPy: residual add + RMSNorm as one node pair whose
backward folds in the residual gradient (kernels/add_rmsnorm.cu's references), and projections of
one input summing their input gradients into one array (beta=1 GEMMs). Forced on in float64 and
compared with the plain model, values and every gradient."""
import numpy as np
import pytest

import llamac
from llamac import runtime
from llamac.config import ModelConfig
from llamac.model.llama import Llama
from llamac.ops import linear, rmsnorm, swiglu
from llamac.train.fusions import fuse

CFG = ModelConfig(dim=16, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=23, max_seq_len=16, hidden_dim=24)


def _loss_and_grads(model, idx, targets):
    for p in model.parameters():
        p.grad = None
    logits, loss = model(idx, targets)
    logits_before = logits.data.copy()
    loss.backward()
    return float(loss.data), logits_before, {n: p.grad.copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_fused_residuals_and_shared_input_projections_match_the_plain_model(monkeypatch, tied):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tied})
    llamac.manual_seed(3)
    model = Llama(cfg).to(dtype="float64")
    rng = np.random.default_rng(0)
    for p in model.parameters():              # norm gains away from 1: their gradients matter
        p.data = p.data + rng.standard_normal(p.shape) * 0.2
    idx, targets = rng.integers(0, 23, (2, 9)), rng.integers(0, 23, (2, 9))
    plain = _loss_and_grads(model, idx, targets)

    monkeypatch.setattr(rmsnorm, "use_fused_residual", lambda x, w: True)
    monkeypatch.setattr(linear, "_sums_in_gemm", lambda x: True)
    calls = {"fwd": 0, "bwd_res": 0}
    fwd, bwd = rmsnorm.add_rmsnorm_forward, rmsnorm.add_rmsnorm_backward

    def counting_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def counting_bwd(*a, dres=None, **k):
        calls["bwd_res"] += dres is not None
        return bwd(*a, dres=dres, **k)

    monkeypatch.setattr(rmsnorm, "add_rmsnorm_forward", counting_fwd)
    monkeypatch.setattr(rmsnorm, "add_rmsnorm_backward", counting_bwd)
    fused_run = _loss_and_grads(fuse(model), idx, targets)
    assert calls["fwd"] == 2 * cfg.n_layers
    assert calls["bwd_res"] == 2 * cfg.n_layers - 1      # all but the final norm fold a residual gradient in
    assert np.isclose(fused_run[0], plain[0], rtol=1e-12)
    assert np.allclose(fused_run[1], plain[1], rtol=1e-10, atol=1e-12)
    for name, g in plain[2].items():
        assert np.allclose(fused_run[2][name], g, rtol=1e-9, atol=1e-12), name


def test_fused_path_is_off_with_dropout_in_training(monkeypatch):
    cfg = ModelConfig(**{**CFG.__dict__, "dropout": 0.1})
    model = fuse(Llama(cfg))
    monkeypatch.setattr(rmsnorm, "use_fused_residual", lambda x, w: True)
    assert not model._fuse_residuals(model.tok_embeddings.weight)
    model.eval()
    assert model._fuse_residuals(model.tok_embeddings.weight)
    with runtime.override(fuse_residuals=False):
        assert not model._fuse_residuals(model.tok_embeddings.weight)


def test_residual_sum_with_an_extra_consumer_keeps_every_gradient(monkeypatch):
    """s feeding something besides the next residual add and its norm: the fallback stays exact."""
    monkeypatch.setattr(rmsnorm, "use_fused_residual", lambda x, w: True)
    rng = np.random.default_rng(1)
    x = llamac.Tensor(rng.standard_normal((3, 8)), requires_grad=True)
    h1 = llamac.Tensor(rng.standard_normal((3, 8)), requires_grad=True)
    h2 = llamac.Tensor(rng.standard_normal((3, 8)), requires_grad=True)
    w = llamac.Tensor(rng.uniform(0.5, 1.5, 8), requires_grad=True)

    def run(fuse):
        for t in (x, h1, h2, w):
            t.grad = None
        if fuse:
            s1, n1 = rmsnorm.add_rms_norm(x, h1, w)
            s2, n2 = rmsnorm.add_rms_norm(s1, n1 * 0.5 + h2, w)
        else:
            s1 = x + h1
            n1 = rmsnorm.rms_norm(s1, w)
            s2 = s1 + (n1 * 0.5 + h2)
            n2 = rmsnorm.rms_norm(s2, w)
        loss = (n2 * n2).sum() + (s2 * 0.3).sum() + (s1 * s1).sum()   # s1: an extra consumer
        loss.backward()
        return [t.grad.copy() for t in (x, h1, h2, w)]

    for got, want in zip(run(True), run(False)):
        assert np.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_add_rmsnorm_references_match_the_unfused_formula():
    rng = np.random.default_rng(2)
    x, h = rng.standard_normal((5, 12)), rng.standard_normal((5, 12))
    w, dy, dres = rng.uniform(0.5, 2, 12), rng.standard_normal((5, 12)), rng.standard_normal((5, 12))
    s, y, rstd = rmsnorm.add_rmsnorm_forward(x, h, w, 1e-5)
    assert np.array_equal(s, x + h)
    want_y, want_rstd = rmsnorm.rmsnorm_forward_reference(x + h, w, 1e-5)
    assert np.allclose(y, want_y) and np.allclose(rstd, want_rstd)
    dx, dw = rmsnorm.add_rmsnorm_backward(dy, s, w, rstd, dres=dres)
    plain_dx, plain_dw = rmsnorm.rmsnorm_backward_reference(dy, s, w, rstd)
    assert np.allclose(dx, plain_dx + dres) and np.allclose(dw, plain_dw)
    dx0, _ = rmsnorm.add_rmsnorm_backward(dy, s, w, rstd)
    assert np.allclose(dx0, plain_dx)
    with pytest.raises(llamac.LlamacError if hasattr(llamac, "LlamacError") else Exception):
        rmsnorm.add_rmsnorm_forward(x, h[:, :6], w)


def test_swiglu_down_matches_swiglu_then_linear():
    """SwiGLUDown (h recomputed in the backward) on NumPy in float64: values and gradients."""
    rng = np.random.default_rng(4)
    gate = llamac.Tensor(rng.standard_normal((2, 5, 12)) * 2, requires_grad=True)
    up = llamac.Tensor(rng.standard_normal((2, 5, 12)), requires_grad=True)
    w = llamac.Tensor(rng.standard_normal((7, 12)) * 0.3, requires_grad=True)
    dout = rng.standard_normal((2, 5, 7))

    def run(fn):
        for t in (gate, up, w):
            t.grad = None
        out = fn()
        out.backward(dout)
        return [out.data.copy()] + [t.grad.copy() for t in (gate, up, w)]

    got = run(lambda: swiglu.SwiGLUDown.apply(gate, up, w))
    want = run(lambda: linear.linear(swiglu.swiglu(gate, up), w))
    for a, b in zip(got, want):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12)
    # A second backward adds into the existing weight gradient (gradient accumulation).
    first_w = w.grad.copy()
    out = swiglu.SwiGLUDown.apply(gate, up, w)
    out.backward(dout)
    assert np.allclose(w.grad, 2 * first_w)
