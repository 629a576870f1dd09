"""The training-step fusions on the GPU: the residual add + RMSNorm kernels against their NumPy
references at awkward sizes, and the fused model (residual adds in the norms, projections summing
their input gradients in the GEMMs, the loss writing the logits' gradient over the logits, the LM
head and loss in row chunks) against the plain one, in fp32 (only rounding differs) and bf16."""
import numpy as np
import pytest

import llamac
from llamac import runtime
from llamac.config import ModelConfig
from llamac.engine import backend
from llamac.model.llama import Llama
from llamac.ops import linear, rmsnorm, swiglu
from llamac.train.fusions import fuse


BF16 = backend.bfloat16
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
TOL = {np.dtype(np.float32): 2e-5, BF16: 1e-2, np.dtype(np.float16): 2e-3}


def rel_err(got, want) -> float:
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


def on_gpu(host, offset=0):
    cp = backend.cupy_module()
    flat = np.empty(host.size + offset, host.dtype)
    flat[offset:] = host.ravel()
    return cp.asarray(flat)[offset:].reshape(host.shape)


def normal(shape, dtype, seed, std=1.0):
    return np.random.default_rng(seed).normal(0, std, shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (7, 129), (3, 1, 1000), (2, 5, 768), (9, 2048), (4, 13000)], ids=str)
def test_add_rmsnorm_kernels(shape, dtype, offset, cache, monkeypatch):
    monkeypatch.setattr(runtime.options(), "rmsnorm_register_cache", cache)
    dtype = DTYPES[dtype]
    x, h, d, e = (normal(shape, dtype, i, 2.0) for i in range(4))
    w = (1 + normal(shape[-1:], np.float32, 9, 0.3)).astype(dtype)
    s, y, rstd = rmsnorm.add_rmsnorm_forward(on_gpu(x, offset), on_gpu(h, offset), on_gpu(w))
    want_s, want_y, want_rstd = rmsnorm.add_rmsnorm_forward_reference(x, h, w)
    assert np.array_equal(backend.to_numpy(s), want_s)       # the sum is rounded once, like x + h
    assert rel_err(y, want_y) <= TOL[dtype] and rel_err(rstd, want_rstd) <= 1e-4
    for dres in (None, e):
        dx, dw = rmsnorm.add_rmsnorm_backward(on_gpu(d, offset), s, on_gpu(w), rstd,
                                              dres=None if dres is None else on_gpu(dres, offset))
        want_dx, want_dw = rmsnorm.add_rmsnorm_backward_reference(d, want_s, w, want_rstd, dres)
        assert dx.dtype == dtype and dw.dtype == np.float32
        assert rel_err(dx, want_dx) <= TOL[dtype], dres is None
        assert rel_err(dw, want_dw) <= 1e-4


def _step(model, idx, targets, fuse, head_loss=False):
    with runtime.override(fuse_residuals=fuse, overwrite_logits=fuse, swiglu_recompute=fuse, packed_qkv=fuse,
                          fused_head_loss=head_loss):
        for p in model.parameters():
            p.grad = None
        logits, loss = model(idx, targets)
        before = None if logits is None else backend.to_numpy(logits.data).astype(np.float32)
        loss.backward()
        after = None if logits is None else backend.to_numpy(logits.data).astype(np.float32)
        grads = {n: backend.to_numpy(p.grad).astype(np.float64) for n, p in model.named_parameters()}
        return float(loss.data), before, after, grads


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-4), ("bfloat16", 6e-2)])
def test_fused_model_matches_the_plain_one(dtype, tol, tie, monkeypatch):
    cfg = ModelConfig(dim=128, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=1000, max_seq_len=80, hidden_dim=200,
                      tie_embeddings=tie)
    llamac.manual_seed(0)
    model = fuse(Llama(cfg).to("cuda", dtype=dtype))
    rng = np.random.default_rng(0)
    for p in model.parameters():          # norm gains away from 1: their gradients matter
        p.data = p.data + backend.cupy_module().asarray(rng.normal(0, 0.1, p.shape).astype(np.float32)).astype(p.dtype)
    xp = backend.cupy_module()
    idx, targets = xp.asarray(rng.integers(0, 1000, (3, 77))), xp.asarray(rng.integers(0, 1000, (3, 77)))
    targets[0, :5] = -100                 # ignored positions count nowhere
    plain = _step(model, idx, targets, False)
    fused = _step(model, idx, targets, True)
    # The chunked head loss, with chunks of 128 rows: 231 rows make two, the second partial.
    monkeypatch.setattr(runtime.options(), "head_loss_chunk_bytes", 128 * 1000 * np.dtype(dtype).itemsize)
    chunked = _step(model, idx, targets, True, head_loss=True)
    assert abs(fused[0] - plain[0]) <= 1e-3 * abs(plain[0])
    assert abs(chunked[0] - plain[0]) <= 1e-3 * abs(plain[0])
    assert rel_err(fused[1], plain[1]) <= tol
    assert np.array_equal(plain[2], plain[1])                 # plain: the logits survive backward
    assert not np.array_equal(fused[2], fused[1])             # fused: they hold their gradient now
    assert chunked[1] is None                                 # chunked: no logits at all
    for name, g in plain[3].items():
        assert rel_err(fused[3][name], g) <= tol, name
        assert rel_err(chunked[3][name], g) <= tol, name


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1, 1000), (2, 77, 200)], ids=str)
def test_swiglu_backward_recompute_kernel(shape, dtype, offset):
    dtype = DTYPES[dtype]
    gate, up, d = normal(shape, dtype, 0, 3.0), normal(shape, dtype, 1), normal(shape, dtype, 2)
    dg, du, h = swiglu.swiglu_backward_recompute(on_gpu(gate, offset), on_gpu(up, offset), on_gpu(d, offset))
    want_dg, want_du = swiglu.swiglu_backward_reference(gate, up, d)
    assert rel_err(dg, want_dg) <= TOL[dtype] and rel_err(du, want_du) <= TOL[dtype]
    forward = swiglu.swiglu_forward(on_gpu(gate, offset), on_gpu(up, offset))
    assert np.array_equal(backend.to_numpy(h), backend.to_numpy(forward))   # the forward's very bits


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1, 1000), (2, 77, 200)], ids=str)
def test_swiglu_backward_recompute_inplace_kernel(shape, dtype, offset):
    """The pass LoRA's MLP runs: dgate, dup and h written over gate, up and dout."""
    dtype = DTYPES[dtype]
    gate, up, d = normal(shape, dtype, 0, 3.0), normal(shape, dtype, 1), normal(shape, dtype, 2)
    want = swiglu.swiglu_backward_recompute(on_gpu(gate, offset), on_gpu(up, offset), on_gpu(d, offset))
    operands = on_gpu(gate, offset), on_gpu(up, offset), on_gpu(d, offset)
    got = swiglu.swiglu_backward_recompute_inplace(*operands)
    assert all(g is o for g, o in zip(got, operands))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[dtype]
    want_dg, want_du = swiglu.swiglu_backward_reference(gate, up, d)
    assert rel_err(got[0], want_dg) <= TOL[dtype] and rel_err(got[1], want_du) <= TOL[dtype]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_recomputed_layers_match_kept_activations_on_the_gpu(dtype, tol):
    # hs = 64: bf16 attention takes the flash kernels (whose dQ atomics are the only reordering).
    cfg = ModelConfig(dim=128, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=500, max_seq_len=80, hidden_dim=200)
    xp = backend.cupy_module()
    rng = np.random.default_rng(0)
    idx, targets = xp.asarray(rng.integers(0, 500, (3, 77))), xp.asarray(rng.integers(0, 500, (3, 77)))
    results = []
    for flag in (False, True):
        llamac.manual_seed(0)
        model = fuse(Llama(cfg).to("cuda", dtype=dtype), recompute=flag)
        _, loss = model(idx, targets)
        loss.backward()
        results.append((float(loss.data), {n: backend.to_numpy(p.grad).astype(np.float64)
                                           for n, p in model.named_parameters()}))
    (loss_kept, kept), (loss_re, re) = results
    assert loss_re == loss_kept
    for name, g in kept.items():
        assert rel_err(re[name], g) <= tol, name


def test_stacked_projection_weights_train_like_separate_ones():
    """On the GPU wq | wk | wv are row blocks of one array (Attention.after_move), which the
    packed attention multiplies by as is (no per-step concatenation): the same loss and gradients
    as separately stored weights, and the blocks stay one array through optimizer steps and a
    state-dict load."""
    from llamac.train.loop import TrainStep
    from llamac.train.optim import AdamW
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=500, max_seq_len=64, hidden_dim=192)
    models = []
    for stacked in (True, False):
        llamac.manual_seed(0)
        model = fuse(Llama(cfg).to("cuda", dtype="bfloat16"))
        att = model.layers[0].attention
        ws = [att.wq.weight, att.wk.weight, att.wv.weight]
        assert linear.StackedRows.adjacent([w.data for w in ws])
        if not stacked:
            for layer in model.layers:
                for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                    m.weight.data = m.weight.data.copy()
            assert not linear.StackedRows.adjacent([w.data for w in ws])
        models.append(model)
    xp = backend.cupy_module()
    rng = np.random.default_rng(3)
    idx, targets = xp.asarray(rng.integers(0, 500, (2, 64))), xp.asarray(rng.integers(0, 500, (2, 64)))
    results = [_step(m, idx, targets, True) for m in models]
    assert results[0][0] == results[1][0]
    for name in results[0][3]:
        assert np.array_equal(results[0][3][name], results[1][3][name]), name
    model = models[0]
    att = model.layers[1].attention
    base = att.wq.weight.data.base
    runner = TrainStep(model, AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1), grad_clip=1.0, cuda_graph=True)
    before = backend.to_numpy(att.wk.weight.data).astype(np.float32)
    for _ in range(4):
        runner(lambda micro: (idx, targets, None), 1e-3)
    runner.release()
    assert att.wq.weight.data.base is base and att.wv.weight.data.base is base      # updated in place
    assert not np.array_equal(backend.to_numpy(att.wk.weight.data).astype(np.float32), before)
    model.load_state_dict({k: backend.to_numpy(v) for k, v in model.state_dict().items()})
    assert linear.StackedRows.adjacent([att.wq.weight.data, att.wk.weight.data, att.wv.weight.data])
