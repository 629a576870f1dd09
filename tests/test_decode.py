"""The fast decoder's NumPy references (llamac/infer/decode.py), on the CPU: packed weights and roundings
against the plain model, and the device sampler's semantics. The kernels themselves: tests/gpu/test_decode.py."""
import math
import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig
from llamac.engine import backend
from llamac.infer import decode, packed
from llamac.model.llama import Llama, rope_tables
from llamac.ops import rope

BF16 = backend.bfloat16


def tiny_model(**kw):
    cfg = ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=160, max_seq_len=64), **kw})
    llamac.manual_seed(0)
    return Llama(cfg).to("cpu", "bfloat16").eval()


@pytest.mark.parametrize("kv", [2, 4])
def test_reference_step_follows_the_plain_bf16_path(kv):
    """reference_step on the packed weights (stacked QKV, interleaved gate/up) gives the plain
    path's next-token logits, steps after a prefill, for GQA and plain attention."""
    model = tiny_model(n_kv_heads=kv)
    cfg = model.config
    layers, extra = packed.pack_weights(cfg, model.state_dict(), np)
    prompt = [[3, 17, 42, 5, 99], [7, 1, 2, 150, 8]]
    M, T = len(prompt), len(prompt[0])
    cache = model.new_cache(batch=M, max_len=32)
    with llamac.no_grad():
        logits, _ = model(np.array(prompt), cache=cache)
    cos, sin = rope_tables(cfg, cfg.head_size, 0, 32, np, BF16)
    state = {"k": [k.copy() for k in cache.k], "v": [v.copy() for v in cache.v], "cos": cos, "sin": sin,
             "lens": np.full(M, T)}
    tokens = logits.data[:, -1].astype(np.float32).argmax(-1)
    for step in range(4):
        state["x"] = extra["emb"][tokens]
        got = decode.reference_step(layers, extra, cfg, state)
        with llamac.no_grad():
            want, _ = model(tokens[:, None], cache=cache)
        want = want.data[:, -1].astype(np.float32)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-2, f"step {step}: rel err {err:.3g}"
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
        state["lens"] = state["lens"] + 1
        tokens = want.argmax(-1)


def test_w13_interleaves_gate_and_up():
    model = tiny_model()
    layers, _ = packed.pack_weights(model.config, model.state_dict(), np)
    L = layers[0]
    assert np.array_equal(L.w13[0::2], L.w1) and np.array_equal(L.w13[1::2], L.w3)
    H, Hkv, hs = 4, 2, 16
    assert np.array_equal(L.wqkv[:H * hs], L.wq) and np.array_equal(L.wqkv[(H + Hkv) * hs:], L.wv)


def test_rope_reference_matches_fused_rope():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 16)).astype(BF16)                 # (M, H, hs), one position per row
    cfg = ModelConfig(dim=64, n_heads=4)
    cos, sin = rope_tables(cfg, 16, 0, 40, np, BF16)
    pos = np.array([0, 7, 39])
    got = decode.rope_reference(x, cos[pos], sin[pos])
    for m, p in enumerate(pos):
        want = rope._rotate(x[m][None, None], cos[p:p + 1], sin[p:p + 1], 1.0)[0, 0]
        assert np.array_equal(got[m].view(np.uint16), want.view(np.uint16))


def test_attention_reference_reads_only_the_filled_cache():
    rng = np.random.default_rng(1)
    M, L, Hkv, G, hs = 2, 20, 2, 3, 8
    kc, vc = (rng.normal(size=(M, L, Hkv, hs)).astype(BF16) for _ in range(2))
    q = rng.normal(size=(M, Hkv * G, hs)).astype(BF16)
    lens = np.array([4, 11])
    out = decode.decode_attention_reference(q, kc, vc, lens, extra=1)
    kc2, vc2 = kc.copy(), vc.copy()
    kc2[0, 5:] = np.nan
    vc2[1, 12:] = np.nan                                       # past the filled part: never read
    assert np.array_equal(decode.decode_attention_reference(q, kc2, vc2, lens, extra=1), out)
    # float64 softmax attention for row 1, head 4 (kv head 1)
    k, v = kc[1, :12, 1].astype(np.float64), vc[1, :12, 1].astype(np.float64)
    s = k @ q[1, 4].astype(np.float64) / np.sqrt(hs)
    p = np.exp(s - s.max())
    np.testing.assert_allclose(out[1, 4].astype(np.float64), (p / p.sum()) @ v, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- sampling

def test_threshold_is_the_radix_selects_answer():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 50, 300).astype(np.uint64)
    w = rng.integers(0, 5, 300).astype(np.uint64)
    for target in [1, 7, 100, int(w.sum())]:
        tau = decode._threshold(keys, w, target)
        assert w[keys >= tau].sum() >= target and w[keys > tau].sum() < target


def test_float_key_orders_like_floats():
    z = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = decode.float_key(z).astype(np.int64)
    assert np.all(np.diff(k) >= 0) and k[3] < k[4]


def test_sample_reference_semantics():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4, 300)).astype(np.float32)
    steps = np.zeros(4, np.int64)
    top = logits.argmax(-1)
    assert np.array_equal(decode.sample_reference(logits, 0.0, None, None, 0, steps), top)
    assert np.array_equal(decode.sample_reference(logits, 1.0, 1, None, 5, steps), top)
    assert np.array_equal(decode.sample_reference(logits, 1.0, None, 1e-6, 5, steps), top)
    a = decode.sample_reference(logits, 0.9, 40, 0.9, 11, steps)
    assert np.array_equal(a, decode.sample_reference(logits, 0.9, 40, 0.9, 11, steps))   # a seed reproduces
    for m in range(4):
        assert a[m] in np.argsort(-logits[m])[:40]


def test_sample_reference_draws_from_the_softmax():
    """Gumbel-max over the hashed uniforms: token frequencies over many steps follow softmax(l / T),
    top-k keeps exactly the k best, top-p the smallest set holding p of the mass."""
    V, n = 6, 6000
    logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]], np.float32))
    counts = {key: np.zeros(V) for key in ("plain", "k2", "p")}
    for s in range(n):
        st = np.array([s])
        counts["plain"][decode.sample_reference(logits, 1.0, None, None, 1, st)[0]] += 1
        counts["k2"][decode.sample_reference(logits, 1.0, 2, None, 1, st)[0]] += 1
        counts["p"][decode.sample_reference(logits, 1.0, None, 0.7, 1, st)[0]] += 1
    np.testing.assert_allclose(counts["plain"] / n, np.exp(logits[0]), atol=0.02)
    np.testing.assert_allclose(counts["k2"] / n, [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0], atol=0.02)
    # 0.4 + 0.25 = 0.65 < 0.7, so the third token is needed too
    np.testing.assert_allclose(counts["p"] / n, [0.4 / 0.8, 0.25 / 0.8, 0.15 / 0.8, 0, 0, 0], atol=0.02)


def test_uniforms_are_in_the_open_interval_and_vary():
    u = decode.rng_uniform_reference(0, 0, 0, 100000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u, decode.rng_uniform_reference(0, 1, 0, 100000))
    assert not np.array_equal(u, decode.rng_uniform_reference(0, 0, 1, 100000))


def test_fast_decoder_refuses_cleanly_without_cuda(monkeypatch):
    from llamac.errors import LlamacError
    monkeypatch.setattr(backend, "_cupy_or_reason", lambda: (None, "no GPU here"))
    model = tiny_model()
    with pytest.raises(LlamacError, match="no GPU here"):
        decode.FastDecoder.from_model(model)


def test_bench_decode_needs_a_gpu():
    from llamac.bench.run import run_bench
    from llamac.errors import LlamacError
    with pytest.raises(LlamacError, match="GPU"):
        run_bench(what="decode", device="cpu")


def test_generate_stays_on_the_plain_path_on_the_cpu():
    from llamac.infer.generate import fast_decoder_for, generate_ids
    model = tiny_model()
    assert fast_decoder_for(model) is None
    a = list(generate_ids(model, [1, 2, 3], 8, temperature=0))
    assert a == list(generate_ids(model, [1, 2, 3], 8, temperature=0, fast=False)) and len(a) == 8


def test_torch_decode_reference_reports_every_figure_per_batch():
    """bench_torch gives, for each batch size, decode tokens/s, step time and time to first token
    (and prefill tokens/s at batch 1), as llamac's rows do; checked on CPU torch at a tiny shape."""
    torch = pytest.importorskip("torch")
    from llamac.bench import decode as decode_bench
    torch.manual_seed(0)
    rows = decode_bench.bench_torch("tiny", n_new=4, prompt_len=3, reps=1, batches=(1, 2), prefill_len=8,
                                    device="cpu", dims=(32, 2, 4, 2, 64, 48))
    assert [(r["impl"].split()[-1], r["batch"]) for r in rows] == [("eager", 1), ("eager", 2)]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("decode_tok_s", "step_ms", "ttft_ms"))   # measured, not a value check
    assert math.isfinite(rows[0]["prefill_tok_s"]) and rows[0]["prefill_len"] == 8
    assert rows[1]["vs_batch1"] == round(rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"], 2)
