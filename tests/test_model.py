"""The Llama model against transformers' LlamaForCausalLM, finite differences, and the KV cache."""
import dataclasses

import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig, Recipe, recipe_from_dict
from llamac.engine.gradcheck import numerical_grads
from llamac.formats import hf
from llamac.model.llama import Llama, rope_inv_freq

GQA_LLAMA3 = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64,
                         hidden_dim=96, tie_embeddings=False, rope_theta=500000.0,
                         rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
TIED = ModelConfig(dim=48, n_layers=2, n_heads=3, vocab_size=61, max_seq_len=32, tie_embeddings=True)


def _hf_model(cfg, model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.hf_config(cfg).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    ref = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    state = hf.to_hf_state({k: np.asarray(v) for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing) == cfg.tie_embeddings or not missing
    return torch, ref


@pytest.mark.parametrize("cfg", [GQA_LLAMA3, TIED], ids=["gqa-untied-llama3", "tied"])
def test_logits_match_transformers(cfg):
    llamac.manual_seed(0)
    model = Llama(cfg)
    torch, ref = _hf_model(cfg, model)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40 if cfg is GQA_LLAMA3 else 20))
    ours, _ = model(idx)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(idx)).logits.numpy()
    rel = np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, rel


def test_llama3_scaling_changes_frequencies():
    base = rope_inv_freq(ModelConfig(rope_theta=500000.0), 64, 64)
    scaling = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    scaled = rope_inv_freq(ModelConfig(rope_theta=500000.0, rope_scaling=scaling), 64, 64)
    assert scaled[0] == base[0]                                 # high frequencies kept
    assert np.isclose(scaled[-1], base[-1] / 8)                 # low frequencies divided by the factor
    assert base[-1] / 8 < scaled[20] < base[20]                 # blended in between


def test_loss_and_gradients_match_finite_differences():
    cfg = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, max_seq_len=8, hidden_dim=12,
                      tie_embeddings=False)
    llamac.manual_seed(1)
    model = Llama(cfg).to(dtype="float64")
    rng = np.random.default_rng(0)
    for p in model.parameters():      # break the symmetric init so every path carries gradient
        p.data = p.data + rng.standard_normal(p.shape) * 0.3
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    segments = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    _, loss = model(idx, targets, segment_ids=segments)
    loss.backward()
    params = dict(model.named_parameters())
    for name in ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                 "layers.0.feed_forward.w1.weight", "layers.0.attention_norm.weight", "output.weight"]:
        p = params[name]

        def f(arr, p=p):
            old = p.data
            p.data = arr
            try:
                return model(idx, targets, segment_ids=segments)[1].data
            finally:
                p.data = old
        (numeric,) = numerical_grads(f, [p.data.copy()], np.float64(1.0))
        assert np.allclose(p.grad, numeric, rtol=1e-5, atol=1e-8), name


def test_segments_isolate_packed_documents():
    llamac.manual_seed(2)
    model = Llama(TIED)
    rng = np.random.default_rng(0)
    a, b, b2 = rng.integers(0, 61, 6), rng.integers(0, 61, 6), rng.integers(0, 61, 6)
    seg = np.array([[0] * 6 + [1] * 6])
    first, _ = model(np.concatenate([a, b])[None], segment_ids=seg)
    second, _ = model(np.concatenate([a, b2])[None], segment_ids=seg)
    alone, _ = model(b[None])
    assert np.array_equal(first.numpy()[0, :6], second.numpy()[0, :6])           # a unaffected by b
    assert np.allclose(first.numpy()[0, 6:], alone.numpy()[0], atol=1e-5)        # b as if alone


def test_kv_cache_matches_recomputation():
    llamac.manual_seed(3)
    model = Llama(GQA_LLAMA3)
    idx = np.random.default_rng(1).integers(0, 97, (2, 12))
    with llamac.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch=2)
        prefix, _ = model(idx[:, :5], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    cached = np.concatenate([prefix.numpy()] + [s.numpy() for s in steps], axis=1)
    assert np.allclose(cached, full.numpy(), atol=1e-5)


def test_hf_layout_round_trip_is_exact():
    llamac.manual_seed(4)
    model = Llama(GQA_LLAMA3)
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    back = hf.from_hf_state(hf.to_hf_state(state, GQA_LLAMA3), GQA_LLAMA3, False)
    assert state.keys() == back.keys() and all(np.array_equal(state[k], back[k]) for k in state)
    back_cfg = hf.model_config_from_hf(hf.hf_config(GQA_LLAMA3))
    sizes = lambda c: (c.dim, c.n_layers, c.n_heads, c.kv_heads, c.head_size, c.ffn_hidden, c.vocab_size)  # noqa: E731
    assert sizes(back_cfg) == sizes(GQA_LLAMA3) and back_cfg.rope_scaling == GQA_LLAMA3.rope_scaling


def test_counts():
    model = Llama(TIED)
    per_layer = 4 * 48 * 48 + 3 * 48 * TIED.ffn_hidden + 2 * 48
    assert model.num_params() == 61 * 48 + 2 * per_layer + 48
    assert model.flops_per_token(32) > 6 * model.num_params()


def test_config_derives_llama_sizes_and_keeps_its_fields():
    """None fields derive Llama's sizes (kv heads = heads, head size = dim / heads, SwiGLU hidden
    2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of); the fields stay None."""
    llama2_7b = ModelConfig(dim=4096, n_layers=32, n_heads=32, multiple_of=256)
    assert (llama2_7b.kv_heads, llama2_7b.head_size, llama2_7b.ffn_hidden) == (32, 128, 11008)
    llama3_8b = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
    assert (llama3_8b.kv_heads, llama3_8b.head_size, llama3_8b.ffn_hidden) == (8, 128, 14336)
    assert ModelConfig(dim=288, multiple_of=32).ffn_hidden == 768      # int(768.0) already a multiple
    assert ModelConfig(dim=100, multiple_of=32).ffn_hidden == 288      # int(266.67) = 266 rounded up
    explicit = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=100)
    assert (explicit.kv_heads, explicit.head_size, explicit.ffn_hidden) == (2, 24, 100)
    for cfg in (llama2_7b, llama3_8b, explicit):
        data = Recipe(model=cfg).to_dict()
        assert data["model"] == dataclasses.asdict(cfg)
        assert not {"kv_heads", "head_size", "ffn_hidden"} & set(data["model"])
        assert recipe_from_dict(data).model == cfg and recipe_from_dict(data).to_dict() == data
    saved = Recipe(model=llama2_7b).to_dict()["model"]
    assert saved["n_kv_heads"] is None and saved["head_dim"] is None and saved["hidden_dim"] is None
    model = Llama(ModelConfig(dim=48, n_layers=1, n_heads=3, vocab_size=11))
    assert model.layers[0].feed_forward.w1.weight.shape == (128, 48)   # 2/3 * 4 * 48 = 128, a multiple of 32
    assert model.layers[0].attention.wk.weight.shape == (48, 48)
