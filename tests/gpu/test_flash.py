"""The flash-attention kernel against the fp32 reference on the GPU, at sizes that are not tile
multiples, and the model's logits with flash against its old (T x T bias) path. Skipped without a GPU."""
import math
import numpy as np
import pytest

import llamac
from llamac import runtime
from llamac.config import ModelConfig
from llamac.engine import backend
from llamac.engine.tensor import no_grad
from llamac.model.llama import Llama
from llamac.ops import attention, flash_forward


BF16 = backend.bfloat16
OUT_TOL = 1e-2     # bf16/fp16 output vs fp32 reference, relative by norm
LSE_TOL = 1e-3     # absolute, natural log


def rel(got, want):
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want).astype(np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def inputs(B, Tq, Tk, H, Hkv, hs, dtype=BF16, seed=0):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(seed)
    # Scaled so that softmaxes are peaked in places (a flat one hides max/rescale bugs).
    q = (rng.standard_normal((B, Tq, H, hs), dtype=np.float32) * 1.5).astype(dtype)
    k = (rng.standard_normal((B, Tk, Hkv, hs), dtype=np.float32) * 1.5).astype(dtype)
    v = rng.standard_normal((B, Tk, Hkv, hs), dtype=np.float32).astype(dtype)
    return q, k, v


def documents(B, Tk, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, Tk), np.int32)
    for b in range(B):
        for c in rng.integers(1, max(Tk, 2), size=3):
            seg[b, c:] += 1
    return backend.cupy_module().asarray(seg)


def check(q, k, v, causal, seg, config=None, what=""):
    out, lse = flash_forward.flash_attention_forward(q, k, v, causal=causal, segments=seg, config=config)
    want, want_lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == np.float32
    o = backend.to_numpy(out).astype(np.float32)
    assert np.isfinite(o).all(), f"{what}: non-finite outputs"
    err = rel(out, want)
    assert err <= OUT_TOL, f"{what}: out rel err {err:.3g}"
    lse_err = float(abs(lse - want_lse).max()) if lse.size else 0.0
    assert lse_err <= LSE_TOL, f"{what}: lse err {lse_err:.3g}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 17, 100, 1000, 2048])
@pytest.mark.parametrize("hs", [32, 48, 64, 96, 128])
def test_kernel_matches_reference(hs, T, G, causal):
    q, k, v = inputs(2, T, T, 4, 4 // G, hs, seed=T + G)
    check(q, k, v, causal, None, what=f"T={T} hs={hs} G={G} causal={causal}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [17, 100, 1000])
@pytest.mark.parametrize("hs", [32, 48, 64, 96, 128])
def test_kernel_with_documents(hs, T, causal):
    q, k, v = inputs(2, T, T, 4, 2, hs, seed=T)
    check(q, k, v, causal, documents(2, T, seed=T), what=f"segments T={T} hs={hs} causal={causal}")


@pytest.mark.parametrize("hs", [48, 64, 128])
@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 1000), (17, 100), (100, 1000), (63, 2048), (130, 131)])
@pytest.mark.parametrize("use_seg", [False, True], ids=["", "segments"])
def test_kernel_queries_after_a_cache(Tq, Tk, hs, use_seg):
    q, k, v = inputs(2, Tq, Tk, 4, 1, hs, seed=Tq)
    check(q, k, v, True, documents(2, Tk, seed=Tk) if use_seg else None, what=f"Tq={Tq} Tk={Tk} hs={hs}")


EVERY_CONFIG = [(BF16, hs, c) for hs in flash_forward.HEAD_DIMS for c in flash_forward.CANDIDATES[hs]]
FP16_DEFAULTS = [(np.dtype(np.float16), hs, flash_forward.CONFIGS[hs]) for hs in flash_forward.HEAD_DIMS]
HOPPER = [(dt, hs, c) for hs in flash_forward.HOPPER_CANDIDATES for c in flash_forward.HOPPER_CANDIDATES[hs]
          for dt in (BF16, np.dtype(np.float16))]


@pytest.mark.parametrize("dtype, hs, cfg", EVERY_CONFIG + FP16_DEFAULTS + HOPPER, ids=str)
def test_kernel_every_config_and_dtype(dtype, hs, cfg):
    if cfg.wgmma and backend.compute_capability() != "90":
        pytest.skip("the wgmma build runs on compute capability 9.0 (H100/H200) only")
    q, k, v = inputs(2, 333, 333, 4, 2, hs, dtype=dtype)
    check(q, k, v, True, documents(2, 333), config=cfg, what=f"{dtype} hs={hs} {cfg}")
    q, k, v = inputs(1, 200, 1000, 2, 2, hs, dtype=dtype, seed=1)
    check(q, k, v, True, None, config=cfg, what=f"{dtype} hs={hs} {cfg} prefill")
    q, k, v = inputs(1, 1, 77, 2, 1, hs, dtype=dtype, seed=2)
    check(q, k, v, False, None, config=cfg, what=f"{dtype} hs={hs} {cfg} decode")


@pytest.mark.parametrize("hs", [48, 64])
def test_kernel_reads_kv_cache_views_without_copying(hs):
    """k/v as the first Tk rows of a longer cache (batch stride > Tk rows) and q as a transpose view."""
    cp = backend.cupy_module()
    q, k, v = inputs(2, 50, 300, 4, 2, hs)
    big_k = cp.zeros((2, 512, 2, hs), BF16)
    big_v = cp.zeros((2, 512, 2, hs), BF16)
    big_k[:, :300], big_v[:, :300] = k, v
    q_view = cp.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)   # (B, Tq, H, hs), strided
    assert not q_view.flags.c_contiguous and not big_k[:, :300].flags.c_contiguous
    check(q_view, big_k[:, :300], big_v[:, :300], True, None, what="views")


def test_long_sequence_needs_no_t_by_t_memory():
    cp = backend.cupy_module()
    T = 8191
    q, k, v = inputs(1, T, T, 2, 1, 128)
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    before = pool.used_bytes()
    out, lse = flash_forward.flash_attention_forward(q, k, v, causal=True)
    cp.cuda.Device().synchronize()
    grown = pool.used_bytes() - before
    assert grown <= out.nbytes + lse.nbytes + 1024, grown      # the outputs, nothing (T, T)
    want, want_lse = flash_forward.attention_forward_reference(q, k, v, True)
    assert rel(out, want) <= OUT_TOL
    assert float(abs(lse - want_lse).max()) <= LSE_TOL


@pytest.mark.parametrize("hs", [48, 64])
def test_fused_attention_uses_flash_and_matches_the_bias_path(monkeypatch, hs):
    q, k, v = (llamac.Tensor(a, requires_grad=True) for a in inputs(2, 77, 77, 4, 2, hs))
    seg = documents(2, 77)
    out = attention.attention(q, k, v, segments=seg, causal=True)
    assert isinstance(out._ctx, attention.FlashAttention)
    proj = llamac.Tensor(backend.cupy_module().random.default_rng(3).standard_normal(out.shape, dtype=np.float32).astype(BF16))
    (out * proj).sum().backward()
    flash_grads = [backend.to_numpy(t.grad) for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setattr(runtime.options(), "flash_attention", False)
    ref = attention.attention(q, k, v, segments=seg, causal=True)
    assert isinstance(ref._ctx, attention.Attention)
    (ref * proj).sum().backward()
    assert rel(out.data, ref.data) <= OUT_TOL
    for got, t in zip(flash_grads, (q, k, v)):
        assert rel(got, t.grad) <= 2e-2


MODEL = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=512,
                    hidden_dim=384, tie_embeddings=False)   # head_dim 64
# head_dim 48, as the 15M model (dim 288, 6 heads)
MODEL48 = ModelConfig(dim=288, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=300, max_seq_len=512,
                      hidden_dim=768, tie_embeddings=False)


def _model(config=MODEL):
    llamac.manual_seed(0)
    model = Llama(config)
    model.to("cuda", dtype="bfloat16")
    return model


@no_grad()
@pytest.mark.parametrize("config", [MODEL, MODEL48], ids=["hs64", "hs48"])
def test_model_logits_flash_vs_bias_path(monkeypatch, config):
    assert attention.use_flash(backend.cupy_module().zeros(1, BF16), config.dim // config.n_heads)
    model = _model(config)
    cp = backend.cupy_module()
    idx = cp.asarray(np.random.default_rng(0).integers(0, MODEL.vocab_size, (2, 300)))
    seg = documents(2, 300)
    with_flash = {}
    for name, s in (("plain", None), ("segments", seg)):
        with_flash[name] = backend.to_numpy(model(idx, segment_ids=s)[0].data).astype(np.float32)
    monkeypatch.setattr(runtime.options(), "flash_attention", False)
    for name, s in (("plain", None), ("segments", seg)):
        old = backend.to_numpy(model(idx, segment_ids=s)[0].data).astype(np.float32)
        assert rel(with_flash[name], old) <= 2e-2, name


@no_grad()
def test_model_kv_cache_prefill_and_decode_with_flash(monkeypatch):
    """Prefill 100 tokens then decode 3 with the cache: logits match the old path's."""
    model = _model()
    cp = backend.cupy_module()
    ids = cp.asarray(np.random.default_rng(1).integers(0, MODEL.vocab_size, (2, 103)))
    runs = []
    for use_flash in (True, False):
        monkeypatch.setattr(runtime.options(), "flash_attention", use_flash)
        cache = model.new_cache(2, 128)
        steps = [model(ids[:, :100], cache=cache)[0].data[:, -1]]
        for t in range(100, 103):
            steps.append(model(ids[:, t:t + 1], cache=cache)[0].data[:, -1])
        runs.append([backend.to_numpy(s).astype(np.float32) for s in steps])
    for got, want in zip(*runs):
        assert rel(got, want) <= 2e-2


def test_flash_benchmarks_run_at_a_tiny_shape():
    """`llamac bench --what kernels` times both flash directions; at a tiny shape each reports a time."""
    from llamac.bench import flash as flash_bench
    fwd = flash_bench.bench_flash_forward(B=1, H=2, T=128, hs=64, reps=2, torch_sdpa=False)
    assert {"ms", "tflops", "hs", "T"} <= set(fwd) and math.isfinite(fwd["ms"])
    (bwd,) = flash_bench.bench_flash_backward(B=1, H=2, T=128, head_dims=(64,), reps=2, warmup=1,
                                              torch_compare=False)
    assert bwd["hs"] == 64 and math.isfinite(bwd["bwd_ms"]) and math.isfinite(bwd["bwd_tflops"])
