"""Activation recomputation (train.recompute): the same loss and gradients as keeping the activations,
less memory held between forward and backward, and a clear error where it cannot apply."""
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig, load_recipe
from llamac.engine.functional import recompute
from llamac.engine.tensor import Tensor
from llamac.errors import LlamacError
from llamac.model.llama import Llama
from llamac.train.fusions import fuse

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16, hidden_dim=48)


def _loss_and_grads(recompute_layers, segments=None, dtype="float64", B=2, T=16, cfg=CFG):
    llamac.manual_seed(0)
    model = Llama(cfg).to(dtype=dtype)
    fuse(model, recompute=recompute_layers)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    _, loss = model(idx, targets, segment_ids=segments)
    loss.backward()
    return float(loss.data), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("segments", [None, np.array([[0] * 7 + [1] * 9, [0] * 16])], ids=["causal", "documents"])
def test_recomputed_layers_give_the_same_loss_and_gradients(segments):
    loss, grads = _loss_and_grads(False, segments)
    loss_r, grads_r = _loss_and_grads(True, segments)
    assert loss_r == loss
    for name, g in grads.items():
        np.testing.assert_allclose(grads_r[name], g, rtol=1e-12, atol=1e-15, err_msg=name)


def test_recompute_holds_less_memory_between_forward_and_backward():
    cfg = ModelConfig(dim=64, n_layers=6, n_heads=4, vocab_size=64, max_seq_len=64, hidden_dim=192)
    held = {}
    for flag in (False, True):
        llamac.manual_seed(0)
        model = Llama(cfg)
        fuse(model, recompute=flag)
        idx = np.random.default_rng(0).integers(0, 64, (8, 64))
        tracemalloc.start()
        _, loss = model(idx, idx)
        held[flag] = tracemalloc.get_traced_memory()[0]      # what the graph keeps for the backward
        tracemalloc.stop()
        loss.backward()
    assert held[True] < 0.5 * held[False], held


def test_recompute_function_and_its_bypass():
    w = Tensor(np.random.default_rng(0).normal(size=(5, 5)), requires_grad=True)
    x = Tensor(np.random.default_rng(1).normal(size=(3, 5)), requires_grad=True)
    out = recompute(lambda t: (t @ w).tanh(), x, [w])
    out.sum().backward()
    gx, gw = x.grad.copy(), w.grad.copy()
    x.grad = w.grad = None
    (x @ w).tanh().sum().backward()
    np.testing.assert_allclose(gx, x.grad, rtol=1e-12)
    np.testing.assert_allclose(gw, w.grad, rtol=1e-12)
    with llamac.no_grad():                                     # nothing to recompute for: plain call
        assert recompute(lambda t: t * 2, x, [w])._ctx is None


def test_recompute_with_dropout_is_a_recipe_error():
    recipe = ROOT / "recipes" / "pretrain" / "debug.yaml"
    with pytest.raises(LlamacError, match="train.recompute needs model.dropout 0"):
        load_recipe(recipe, ["train.recompute=true", "model.dropout=0.1"])
    assert load_recipe(recipe, ["train.recompute=true"]).train.recompute is True
