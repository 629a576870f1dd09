"""The flash-attention backward kernel against the fp32 reference on the GPU, at sizes that
are not tile multiples (T = 1, 17, 100, 1000, 8191), head dims 32, 48, 64, 96, 128, GQA,
causal or not, documents, and queries that are only the last Tq of the Tk positions."""
import numpy as np
import pytest

from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.ops import flash_backward, flash_forward, rope


BF16 = backend.bfloat16

CASES = [  # B, Tq, Tk, H, Hkv, hs, causal, segments
    (2, 1, 1, 2, 2, 64, True, False),
    (2, 17, 17, 4, 2, 64, True, False),
    (2, 100, 100, 4, 1, 128, True, False),
    (2, 1000, 1000, 4, 4, 64, True, False),
    (2, 1000, 1000, 4, 2, 128, False, False),
    (2, 2048, 2048, 4, 1, 64, True, False),
    (2, 2048, 2048, 4, 2, 128, True, False),
    (2, 17, 100, 4, 2, 64, True, False),       # queries = the last 17 of 100 positions
    (2, 1, 1000, 4, 4, 128, True, False),      # one decode-like query
    (2, 100, 1000, 2, 1, 128, False, False),
    (2, 1000, 1000, 4, 2, 64, True, True),     # packed documents
    (2, 1000, 1000, 2, 2, 128, False, True),
    (2, 300, 1000, 4, 1, 64, True, True),
    (1, 8191, 8191, 2, 1, 64, True, True),
    # head_dim 48 (the 15M model's), padded shared rows and an odd 8 of dQ columns per warp
    (2, 1, 1, 2, 2, 48, True, False),
    (2, 17, 17, 4, 2, 48, True, False),
    (2, 100, 100, 4, 1, 48, False, False),
    (2, 1000, 1000, 4, 2, 48, True, False),
    (2, 17, 100, 4, 2, 48, True, False),
    (2, 1, 1000, 4, 4, 48, True, False),
    (2, 100, 1000, 2, 1, 48, False, False),
    (2, 1000, 1000, 4, 2, 48, True, True),
    (2, 300, 1000, 4, 1, 48, True, True),
    (2, 333, 333, 6, 6, 48, False, True),
    (8, 256, 256, 6, 6, 48, True, False),      # the 15M training shape, fewer rows
    # 32 and 96 come out of the same code
    (2, 1000, 1000, 4, 2, 32, True, True),
    (2, 17, 100, 4, 1, 32, False, False),
    (2, 1000, 1000, 4, 2, 96, True, True),
    (2, 17, 100, 4, 1, 96, False, False),
]


def inputs(B, Tq, Tk, H, Hkv, hs, segments, dtype=BF16, seed=0):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(seed)
    q = rng.standard_normal((B, Tq, H, hs), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((B, Tk, Hkv, hs), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((B, Tk, Hkv, hs), dtype=np.float32).astype(dtype)
    dout = rng.standard_normal((B, Tq, H, hs), dtype=np.float32).astype(dtype)
    seg = None
    if segments:  # sorted document ids with lengths that cross every tile boundary
        seg = cp.cumsum(rng.random((B, Tk)) < 0.01, axis=1).astype(np.int64)
    return q, k, v, dout, seg


def rel_norm(got, want) -> float:
    """|got - want| / |want| by norm, with |want| floored at 1e-2 RMS: a gradient that is zero in
    exact arithmetic (dq with a single visible key: dS = dP - D = 0) is rounding noise in both."""
    got, want = got.astype(np.float32), want.astype(np.float32)
    floor = 1e-2 * float(np.sqrt(want.size))
    return float(np.linalg.norm((got - want).ravel()) / max(float(np.linalg.norm(want.ravel())), floor))


def check(case, dtype=BF16, tol=1e-2, seed=0, **tiles):
    B, Tq, Tk, H, Hkv, hs, causal, segmented = case
    q, k, v, dout, seg = inputs(B, Tq, Tk, H, Hkv, hs, segmented, dtype, seed)
    out32, lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    out = out32.astype(dtype)  # what the forward kernel hands over
    got = flash_backward.flash_attention_backward(q, k, v, out, dout, lse, causal, seg, **tiles)
    want = flash_forward.attention_backward_reference(q, k, v, out, dout, lse, causal, seg)
    for name, g, w, like in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.dtype == dtype and g.shape == like.shape, name
        assert bool(backend.cupy_module().isfinite(g.astype(np.float32)).all()), f"{name}: not finite"
        err = rel_norm(g, w)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol} for {case}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference_bf16(case):
    check(case)


@pytest.mark.parametrize("case", [(2, 100, 300, 4, 2, 64, True, True), (2, 1000, 1000, 4, 1, 128, True, False),
                                  (2, 100, 300, 4, 2, 48, True, True)], ids=str)
def test_kernel_matches_reference_fp16(case):
    check(case, np.dtype(np.float16), tol=5e-3)


VARIANT_CASES = [(2, 333, 333, 4, 2, 128, True, False), (2, 150, 777, 4, 1, 64, True, True),
                 (1, 200, 200, 2, 2, 64, False, False), (2, 150, 777, 4, 1, 48, True, True),
                 (1, 200, 200, 2, 2, 48, False, False), (2, 333, 333, 4, 2, 32, True, False),
                 (2, 333, 333, 4, 2, 96, True, False)]


@pytest.mark.parametrize("case, tiles", [(c, t) for c in VARIANT_CASES for t in flash_backward.variants(c[5])], ids=str)
def test_every_tile_variant_matches_reference(case, tiles):
    if tiles.wgmma and backend.compute_capability() != "90":
        pytest.skip("the wgmma build runs on compute capability 9.0 (H100/H200) only")
    check(case, tiles=tiles)


HOPPER_CASES = [c for c in CASES if c[5] == 64] + [(2, 64, 64, 2, 2, 64, True, False),
                                                   (2, 129, 257, 4, 2, 64, True, True)]


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case, tiles", [(c, t) for c in HOPPER_CASES for t in flash_backward.HOPPER_VARIANTS], ids=str)
def test_warpgroup_mma_variants_match_reference(case, tiles, dtype):
    if backend.compute_capability() != "90":
        pytest.skip("the wgmma build runs on compute capability 9.0 (H100/H200) only")
    check(case, dtype, tiles=tiles)


def test_masked_keys_get_no_gradient():
    # Causal with an offset: the keys after the last query's position see no query at all.
    cp = backend.cupy_module()
    q, k, v, dout, _ = inputs(1, 50, 200, 2, 2, 64, False)
    seg = cp.zeros((1, 200), np.int64)
    seg[:, :120] = 1          # the queries (positions 150..199) are in document 0: keys < 120 unseen
    out32, lse = flash_forward.attention_forward_reference(q, k, v, True, seg)
    _, dk, dv = flash_backward.flash_attention_backward(q, k, v, out32.astype(BF16), dout, lse, True, seg)
    assert float(cp.abs(dk[:, :120].astype(np.float32)).max()) == 0.0
    assert float(cp.abs(dv[:, :120].astype(np.float32)).max()) == 0.0
    assert float(cp.abs(dv[:, 120:].astype(np.float32)).max()) > 0.0


def test_gpu_launcher_refuses_what_the_kernel_cannot_do():
    cp = backend.cupy_module()
    q = cp.zeros((1, 8, 2, 64), BF16)
    lse = cp.zeros((1, 2, 8), np.float32)
    with pytest.raises(LlamacError, match="bfloat16 or float16"):
        f = q.astype(np.float32)
        flash_backward.flash_attention_backward(f, f, f, f, f, lse)
    with pytest.raises(LlamacError, match="head_dim"):
        z = cp.zeros((1, 8, 2, 40), BF16)   # not a multiple of 16
        flash_backward.flash_attention_backward(z, z, z, z, z, lse)
    with pytest.raises(LlamacError, match="tiles for head_dim 48"):
        z = cp.zeros((1, 8, 2, 48), BF16)
        flash_backward.flash_attention_backward(z, z, z, z, z, lse, tiles=(32, 8, 1))
    with pytest.raises(LlamacError, match="C-contiguous"):
        t = cp.zeros((1, 2, 8, 64), BF16).transpose(0, 2, 1, 3)
        flash_backward.flash_attention_backward(t, q, q, q, q, lse)


ROPE_CASES = [(2, 1, 1, 2, 2, 64, True, False), (2, 100, 100, 4, 1, 128, True, False),
              (2, 1000, 1000, 4, 2, 64, True, True), (2, 333, 333, 6, 6, 48, False, True),
              (2, 77, 77, 4, 2, 96, True, False), (2, 77, 77, 4, 2, 32, True, False)]


@pytest.mark.parametrize("table_dtype", ["model", "float32"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_rope_folded_into_the_kernel_matches_rope_backward_after(case, table_dtype):
    """dK (rotated in the main kernel's store) and dQ (in the dq conversion) against the fp32
    reference gradients rotated back by the RoPE reference; tables in bf16 (as the model keeps
    them) or fp32."""
    from llamac.ops.rope import rope_reference
    cp = backend.cupy_module()
    B, T, _, H, Hkv, hs, causal, segmented = case
    q, k, v, dout, seg = inputs(B, T, T, H, Hkv, hs, segmented, seed=3)
    angles = cp.arange(T)[:, None] * (10000.0 ** (-cp.arange(0, hs, 2) / hs))[None, :]
    dt = BF16 if table_dtype == "model" else np.float32
    cos, sin = cp.cos(angles).astype(dt), cp.sin(angles).astype(dt)
    out32, lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    out = out32.astype(BF16)
    got = flash_backward.flash_attention_backward(q, k, v, out, dout, lse, causal, seg, rope=(cos, sin))
    want = flash_forward.attention_backward_reference(q, k, v, out, dout, lse, causal, seg)
    want = (rope_reference(want[0], cos, sin, -1.0), rope_reference(want[1], cos, sin, -1.0), want[2])
    for name, g, w, like in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.dtype == BF16 and g.shape == like.shape, name
        err = rel_norm(g, w)
        assert err <= 1e-2, f"{name}: relative error {err:.3g} for {case}"


@pytest.mark.parametrize("case", [(2, 1, 1, 2, 2, 64, True, False), (2, 333, 333, 6, 2, 48, True, True),
                                  (2, 1000, 1000, 4, 1, 128, True, False)], ids=str)
def test_gradients_written_into_a_packed_buffer_equal_the_contiguous_ones(case):
    """grads_out: dq, dk, dv as the q|k|v views of one (B, T, (H + 2 Hkv) hs) gradient, bit for bit
    what the kernels return as separate arrays (RoPE folded in for both); v read as the v view of
    a packed projection gives the same too."""
    cp = backend.cupy_module()
    B, T, _, H, Hkv, hs, causal, segmented = case
    q, k, v, dout, seg = inputs(B, T, T, H, Hkv, hs, segmented, seed=4)
    packed_in = cp.zeros((B, T, (H + 2 * Hkv) * hs), BF16)
    v_view = packed_in[..., (H + Hkv) * hs:].reshape(v.shape)
    v_view[...] = v
    angles = cp.arange(T)[:, None] * (10000.0 ** (-cp.arange(0, hs, 2) / hs))[None, :]
    rope = (cp.cos(angles).astype(BF16), cp.sin(angles).astype(BF16))
    out32, lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    out = out32.astype(BF16)
    want = flash_backward.flash_attention_backward(q, k, v, out, dout, lse, causal, seg, rope=rope)
    packed = cp.full((B, T, (H + 2 * Hkv) * hs), np.nan, np.float32).astype(BF16)
    views = (packed[..., :H * hs].reshape(q.shape), packed[..., H * hs:(H + Hkv) * hs].reshape(k.shape),
             packed[..., (H + Hkv) * hs:].reshape(v.shape))
    got = flash_backward.flash_attention_backward(q, k, v_view, out, dout, lse, causal, seg, rope=rope, grads_out=views)
    assert all(g is w for g, w in zip(got, views))
    for name, g, w in zip(("dq", "dk", "dv"), views, want):
        assert bool(cp.array_equal(g.astype(np.float32), w.astype(np.float32))), name
    assert not bool(cp.isnan(packed.astype(np.float32)).any())       # every column written


@pytest.mark.parametrize("shape", [(2, 1, 6, 2, 2, 64), (3, 77, 6, 2, 2, 48), (1, 300, 12, 4, 4, 128)], ids=str)
def test_rope_reads_a_packed_view_in_place(shape):
    """rope.rope_forward/backward on q or k inside a packed projection (positions W apart) give
    exactly what they give on a contiguous copy."""
    cp = backend.cupy_module()
    B, T, H, Hk, Hv, hs = shape
    packed = cp.random.default_rng(5).standard_normal((B, T, (H + Hk + Hv) * hs), dtype=np.float32).astype(BF16)
    angles = cp.arange(T)[:, None] * (10000.0 ** (-cp.arange(0, hs, 2) / hs))[None, :]
    cos, sin = cp.cos(angles).astype(BF16), cp.sin(angles).astype(BF16)
    for lo, n in ((0, H), (H, Hk)):
        view = packed[..., lo * hs:(lo + n) * hs].reshape(B, T, n, hs)
        assert rope.position_stride(view) == packed.shape[-1]
        for fn in (rope.rope_forward, rope.rope_backward):
            got, want = fn(view, cos, sin), fn(cp.ascontiguousarray(view), cos, sin)
            assert got.flags.c_contiguous
            assert bool(cp.array_equal(got.astype(np.float32), want.astype(np.float32)))
