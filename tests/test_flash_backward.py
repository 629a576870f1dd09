"""The flash-attention backward on the CPU: the fp32 references against float64 finite
differences and a direct formula, the launcher's NumPy path and its checks, and the
kernel source compiled with NVRTC for every head_dim / tile it is launched with."""
import math
import re

import numpy as np
import pytest

from llamac.bench import flash as flash_bench
from llamac.engine import backend
from llamac.errors import LlamacError, ShapeError
from llamac.ops import attention, flash_backward, flash_forward, linear, rope
from llamac.ops.flash_backward import Tiles

BF16 = backend.bfloat16


def make(B, Tq, Tk, H, Hkv, hs, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, Tq, H, hs)).astype(dtype)
    k = rng.normal(size=(B, Tk, Hkv, hs)).astype(dtype)
    v = rng.normal(size=(B, Tk, Hkv, hs)).astype(dtype)
    dout = rng.normal(size=(B, Tq, H, hs)).astype(dtype)
    return q, k, v, dout


def direct_attention(q, k, v, causal, segments):
    """Loop-per-(b, h, i) float64 attention with the documented visibility rule."""
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    out = np.zeros((B, Tq, H, hs))
    lse = np.zeros((B, H, Tq))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                pos = Tk - Tq + i
                keys = [j for j in range(Tk) if (not causal or j <= pos)
                        and (segments is None or segments[b, j] == segments[b, pos])]
                s = np.array([q[b, i, h] @ k[b, j, h // G] for j in keys]) / math.sqrt(hs)
                m = s.max()
                lse[b, h, i] = m + math.log(np.exp(s - m).sum())
                p = np.exp(s - lse[b, h, i])
                out[b, i, h] = p @ v[b, keys, h // G]
    return out, lse


CASES = [  # B, Tq, Tk, H, Hkv, hs, causal, with segments
    (1, 5, 5, 2, 2, 4, True, False),
    (2, 3, 7, 4, 2, 4, True, False),    # queries are the last 3 of 7 positions; GQA G=2
    (1, 6, 6, 4, 1, 3, False, False),   # G=4, no mask
    (2, 6, 9, 2, 1, 4, True, True),     # documents and an offset
    (1, 5, 5, 2, 2, 4, False, True),
]


def segments_for(B, Tk, rng):
    return np.sort(rng.integers(0, 3, (B, Tk)), axis=1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_forward_matches_direct_loops(case):
    B, Tq, Tk, H, Hkv, hs, causal, seg = case
    q, k, v, _ = make(B, Tq, Tk, H, Hkv, hs)
    segments = segments_for(B, Tk, np.random.default_rng(1)) if seg else None
    out, lse = flash_forward.attention_forward_reference(q, k, v, causal, segments)
    want_out, want_lse = direct_attention(q, k, v, causal, segments)
    assert out.shape == q.shape and lse.shape == (B, H, Tq)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_backward_matches_finite_differences(case):
    B, Tq, Tk, H, Hkv, hs, causal, seg = case
    q, k, v, dout = make(B, Tq, Tk, H, Hkv, hs, seed=2)
    segments = segments_for(B, Tk, np.random.default_rng(3)) if seg else None
    out, lse = flash_forward.attention_forward_reference(q, k, v, causal, segments)
    dq, dk, dv = flash_forward.attention_backward_reference(q, k, v, out, dout, lse, causal, segments)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    def loss(q, k, v):
        return float((flash_forward.attention_forward_reference(q, k, v, causal, segments)[0] * dout).sum())

    h = 1e-6
    for grad, which in ((dq, 0), (dk, 1), (dv, 2)):
        num = np.zeros_like(grad)
        args = [q, k, v]
        for idx in np.ndindex(grad.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            num[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7, err_msg=f"d{'qkv'[which]}")
    if seg or causal:  # a key a query can't see gets no gradient from it: the mask is real
        assert np.abs(dk).sum() > 0


def test_reference_lower_precision_inputs_compute_in_fp32():
    q, k, v, dout = make(2, 33, 40, 4, 2, 16, dtype=BF16, seed=4)
    out, lse = flash_forward.attention_forward_reference(q, k, v)
    grads = flash_forward.attention_backward_reference(q, k, v, out.astype(BF16), dout, lse)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)
    q64, k64, v64, d64 = (a.astype(np.float64) for a in (q, k, v, dout))
    out64, lse64 = flash_forward.attention_forward_reference(q64, k64, v64)
    want = flash_forward.attention_backward_reference(q64, k64, v64, out64, d64, lse64)
    for got, w in zip(grads, want):
        # out rounded to bf16 enters D = rowsum(dout * out): about bf16's precision
        assert np.linalg.norm(got - w) / np.linalg.norm(w) < 1e-2


def test_launcher_on_numpy_is_the_reference_in_the_input_dtype():
    q, k, v, dout = make(1, 9, 12, 4, 2, 8, dtype=np.float16, seed=5)
    out, lse = flash_forward.attention_forward_reference(q, k, v)
    segments = np.array([[0] * 5 + [1] * 7])
    got = flash_backward.flash_attention_backward(q, k, v, out.astype(np.float16), dout, lse, True, segments)
    want = flash_forward.attention_backward_reference(q, k, v, out.astype(np.float16), dout, lse, True, segments)
    for g, w, like in zip(got, want, (q, k, v)):
        assert g.dtype == np.float16 and g.shape == like.shape
        assert np.array_equal(g, w.astype(np.float16))


def test_launcher_checks_operands():
    q, k, v, dout = make(1, 4, 6, 4, 2, 8, dtype=np.float32)
    out, lse = flash_forward.attention_forward_reference(q, k, v)
    with pytest.raises(ShapeError, match="multiple of Hkv"):
        flash_backward.flash_attention_backward(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), out, dout, lse)
    with pytest.raises(ShapeError, match="last Tq"):
        flash_backward.flash_attention_backward(q, k[:, :3], v[:, :3], out, dout, lse)
    with pytest.raises(ShapeError, match="lse"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse[:, :1])
    with pytest.raises(ShapeError, match="dout"):
        flash_backward.flash_attention_backward(q, k, v, out, dout[:, :2], lse)
    with pytest.raises(ShapeError, match="segments"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse, segments=np.zeros((1, 4), np.int64))
    with pytest.raises(LlamacError, match="integer"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse, segments=np.zeros((1, 6), np.float32))
    with pytest.raises(LlamacError, match="dtypes must match"):
        flash_backward.flash_attention_backward(q, k.astype(np.float16), v, out, dout, lse)
    with pytest.raises(LlamacError, match="NumPy or CuPy"):
        flash_backward.flash_attention_backward(q.tolist(), k, v, out, dout, lse)


def test_flop_count():
    # causal backward = 2.5 x the causal forward's 2 * 2 * B H T^2 hs / 2
    assert flash_backward.backward_flops(8, 16, 2048, 2048, 64) == 2.5 * 2 * 2 * 8 * 16 * 2048 * 2048 * 64 / 2
    assert flash_backward.backward_flops(1, 1, 4, 4, 8, causal=False) == 2.5 * 4 * 16 * 8


def test_shared_memory_fits_the_sm():
    # H100: 227 KB of shared memory per SM; two CTAs resident is the design point.
    for hs in flash_backward.HEAD_DIMS:
        for tiles in flash_backward.VARIANTS:
            assert flash_backward.shared_bytes(hs, tiles) <= 227 * 1024
        assert 2 * flash_backward.shared_bytes(64, flash_backward.TILES[64]) <= 227 * 1024  # two CTAs of 4 warps per SM


def test_bench_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(backend, "_cupy_or_reason", lambda: (None, "CuPy is not installed"))
    with pytest.raises(LlamacError, match="needs a CUDA GPU"):
        flash_bench.bench_flash_backward()


# ---------------------------------------------------------------- NVRTC, no GPU

@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is not installed")
    if not backend.nvrtc_available():
        pytest.skip(backend.nvrtc_unavailable_reason())


def test_tile_variants_per_head_size():
    # dQ's (block_q, hs) tile splits over the warps in 16-row tiles times multiples of 8 columns
    assert flash_backward.variants(64) == flash_backward.VARIANTS + flash_backward.HOPPER_VARIANTS and flash_backward.variants(128) == flash_backward.VARIANTS
    assert all(not flash_backward.tiles_fit(hs, t) for hs in (32, 48, 96, 128) for t in flash_backward.HOPPER_VARIANTS)   # wgmma: hs 64
    assert flash_backward.variants(48) == (Tiles(block_q=32, warps=4, key_tiles=1), Tiles(block_q=64, warps=4, key_tiles=1),
                                       Tiles(block_q=64, warps=8, key_tiles=1), Tiles(block_q=32, warps=4, key_tiles=2))   # (32, 8, *): 12 columns
    assert flash_backward.variants(32) == flash_backward.VARIANTS and flash_backward.variants(96) == flash_backward.VARIANTS
    assert all(t.wgmma for t in flash_backward.HOPPER_VARIANTS) and not any(t.wgmma for t in flash_backward.VARIANTS)
    for hs in flash_backward.HEAD_DIMS:
        assert flash_backward.TILES[hs] in flash_backward.variants(hs)
        assert flash_backward.default_tiles(hs, 4096) == flash_backward.TILES[hs]
    for hs, tiles in flash_backward.SHORT_TILES.items():
        assert tiles in flash_backward.variants(hs) and flash_backward.default_tiles(hs, flash_backward.SHORT_TK) == tiles
    assert flash_backward.default_tiles(64, 256) == flash_backward.TILES[64]   # only hs=48 was timed short


def test_tiles_from_plain_tuples():
    """tiles= also takes (block_q, warps, key_tiles[, wgmma]) tuples."""
    assert Tiles.of((32, 4, 2)) == flash_backward.TILES[64] and Tiles.of(flash_backward.TILES[64]) is flash_backward.TILES[64]
    assert Tiles.of((128, 8, 1, True)) == flash_backward.HOPPER_VARIANTS[0]
    assert flash_backward.tiles_fit(64, (32, 4, 2)) and not flash_backward.tiles_fit(48, (32, 8, 1))
    assert flash_backward.shared_bytes(64, (32, 4, 2)) == flash_backward.shared_bytes(64, flash_backward.TILES[64])
    for bad in ((32, 4), (32, 4, 2, False, 1), 32):
        with pytest.raises(LlamacError, match="tiles must be"):
            Tiles.of(bad)


def test_hopper_takes_the_warpgroup_backward_at_head_size_64():
    assert set(flash_backward.HOPPER_TILES) == {64} and all(t in flash_backward.HOPPER_VARIANTS for t in flash_backward.HOPPER_TILES.values())
    for Tk in (64, 1024, 8192):
        assert flash_backward.default_tiles(64, Tk, "90") == flash_backward.HOPPER_TILES[64]
        assert flash_backward.default_tiles(64, Tk, "80") == flash_backward.default_tiles(64, Tk) == flash_backward.TILES[64]
    assert flash_backward.default_tiles(128, 2048, "90") == flash_backward.TILES[128]   # no wgmma build at other head sizes
    assert flash_backward.default_tiles(48, 256, "90") == flash_backward.SHORT_TILES[48]
    # the kernel's layout: K, V (128 keys) + 2 stages of Q, dO (128 queries), unpadded 16-bit rows;
    # dS^T (128 x 128); 2 stages of lse, D, query ids; key ids; fp32 dQ rows padded by 8 floats.
    # One CTA of 8 warps fits an H100's 227 KB.
    smem = flash_backward.shared_bytes(64, Tiles(block_q=128, warps=8, key_tiles=1, wgmma=True))
    assert smem == 2 * 128 * 64 * 2 + 4 * 128 * 64 * 2 + 128 * 128 * 2 + 6 * 128 * 4 + 128 * 4 + 128 * 72 * 4
    assert smem <= 227 * 1024


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hs", flash_backward.HEAD_DIMS)
def test_kernel_compiles_without_spills(nvrtc, hs, dtype):
    check_build(hs, flash_backward.TILES[hs], dtype)
    if hs in flash_backward.SHORT_TILES:
        check_build(hs, flash_backward.SHORT_TILES[hs], dtype)


# every variant of the new head sizes that a benchmark may pick (key_tiles 2 spills at hs >= 96,
# as at 128, so those stay out of TILES)
@pytest.mark.parametrize("hs, tiles", [(hs, t) for hs in (32, 48, 96) for t in flash_backward.variants(hs)
                                       if not (hs >= 96 and t.key_tiles == 2)], ids=str)
def test_small_head_variants_compile_without_spills(nvrtc, hs, tiles):
    ptx = check_build(hs, tiles, BF16)
    if (hs // (tiles.warps // (tiles.block_q // 16))) % 16:   # a warp's dQ columns end in an odd 8: one x2 load
        assert "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16" in ptx


@pytest.mark.parametrize("tiles", flash_backward.HOPPER_VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
def test_warpgroup_mma_build_compiles_without_spills(nvrtc, tiles, dtype):
    options = (f"-DHEAD_DIM=64", f"-DBLOCK_Q={tiles.block_q}", f"-DNWARPS={tiles.warps}", f"-DKEY_TILES={tiles.key_tiles}",
               "-DLLAMAC_WGMMA", "--ptxas-options=-v")
    assert tiles.options() == options[1:5] and tiles.arch == "sm_90a"    # what the launcher builds
    result = backend.compile_check_kernel(flash_backward.KERNEL, dtype, arch="sm_90a", options=options)
    assert result.ok, result.log
    kind = "bf16.bf16" if dtype == BF16 else "f16.f16"
    # S^T, dP^T over 128 queries (m64n128k16) and dQ from shared memory; dV, dK with P^T, dS^T
    # from registers (m64n64k16); dQ leaves through bulk adds from shared memory, no atomics
    assert result.ptx.count(f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{kind}") >= 2
    assert result.ptx.count(f"wgmma.mma_async.sync.aligned.m64n64k16.f32.{kind}") >= 3
    assert "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32" in result.ptx
    assert "red.global.add" not in result.ptx and "cp.async.bulk.wait_group 0" in result.ptx
    assert "mma.sync" not in result.ptx and "fence.proxy.async.shared::cta" in result.ptx
    spills = re.findall(r"(\d+) bytes spill stores", result.log)
    assert spills and all(n == "0" for n in spills), result.log
    # the warpgroup barriers are named by constants (a register id reserves all 16)
    assert "used 16 barriers" not in result.log
    bad = options[:1] + ("-DBLOCK_Q=32",) + options[2:]
    result = backend.compile_check_kernel(flash_backward.KERNEL, dtype, arch="sm_90a", options=bad)
    assert not result.ok and "LLAMAC_WGMMA takes HEAD_DIM 64" in result.log


def test_kernel_refuses_a_dq_split_that_does_not_fit(nvrtc):
    options = ("-DHEAD_DIM=48", "-DBLOCK_Q=32", "-DNWARPS=8", "-DKEY_TILES=1")
    result = backend.compile_check_kernel(flash_backward.KERNEL, BF16, arch="sm_90", options=options)
    assert not result.ok and "column blocks of 8" in result.log


def check_build(hs, tiles, dtype):
    options = (f"-DHEAD_DIM={hs}", f"-DBLOCK_Q={tiles.block_q}", f"-DNWARPS={tiles.warps}", f"-DKEY_TILES={tiles.key_tiles}",
               "--ptxas-options=-v")
    assert tiles.options() == options[1:4] and tiles.arch is None    # what the launcher builds
    result = backend.compile_check_kernel(flash_backward.KERNEL, dtype, arch="sm_90", options=options)
    assert result.ok, result.log
    for function in ("flash_attn_bwd", "flash_attn_bwd_preprocess", "flash_attn_bwd_convert_dq"):
        assert f".entry {function}(" in result.ptx
    # Tensor cores, fed by ldmatrix: the whole point of the kernel.
    mma = "mma.sync.aligned.m16n8k16.row.col.f32." + ("bf16.bf16" if dtype == BF16 else "f16.f16")
    assert mma in result.ptx and "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in result.ptx
    # A spill to local memory in the inner loop costs more than the tile size saves.
    spills = re.findall(r"(\d+) bytes spill stores", result.log)
    assert spills and all(n == "0" for n in spills), result.log
    return result.ptx


# ---------------------------------------------------------------- RoPE folded into the backward

def tables(T, hs, seed=7):
    angles = np.arange(T)[:, None] * np.random.default_rng(seed).uniform(0.01, 1.0, hs // 2)[None, :]
    return np.cos(angles), np.sin(angles)


@pytest.mark.parametrize("causal, seg", [(True, False), (True, True), (False, False)])
def test_rope_folded_on_numpy_is_rope_backward_after_the_plain_backward(causal, seg):
    from llamac.ops.rope import rope_reference
    q, k, v, dout = make(2, 7, 7, 4, 2, 6, seed=8)
    segments = segments_for(2, 7, np.random.default_rng(9)) if seg else None
    cos, sin = tables(7, 6)
    out, lse = flash_forward.attention_forward_reference(q, k, v, causal, segments)
    dq, dk, dv = flash_backward.flash_attention_backward(q, k, v, out, dout, lse, causal, segments, rope=(cos, sin))
    pq, pk, pv = flash_backward.flash_attention_backward(q, k, v, out, dout, lse, causal, segments)
    np.testing.assert_allclose(dq, rope_reference(pq, cos, sin, -1.0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dk, rope_reference(pk, cos, sin, -1.0), rtol=1e-13, atol=1e-13)
    assert np.array_equal(dv, pv)
    assert not np.allclose(dq, pq)          # the tables do rotate: the fold is not the identity


def test_rope_fold_refuses_tables_that_do_not_fit():
    q, k, v, dout = make(1, 4, 6, 2, 1, 4)
    out, lse = flash_forward.attention_forward_reference(q, k, v)
    with pytest.raises(ShapeError, match="Tq == Tk"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse, rope=tables(4, 4))
    q, k, v, dout = make(1, 4, 4, 2, 1, 4)
    out, lse = flash_forward.attention_forward_reference(q, k, v)
    with pytest.raises(ShapeError, match="rope cos"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse, rope=tables(5, 4))
    with pytest.raises(LlamacError, match="pair"):
        flash_backward.flash_attention_backward(q, k, v, out, dout, lse, rope=tables(4, 4)[0])


@pytest.mark.parametrize("seg", [False, True])
def test_packed_attention_function_matches_finite_differences_and_the_composition(seg):
    """RoPEFlashAttention on a packed q|k|v (its NumPy path: the references) against float64 finite
    differences, and against RoPE + attention on the sliced projection."""
    from llamac.engine.gradcheck import check_grad
    from llamac.engine.tensor import Tensor
    H, Hkv, hs, T = 4, 2, 4, 6
    qkv = np.random.default_rng(10).normal(size=(1, T, (H + 2 * Hkv) * hs))
    cos, sin = tables(T, hs)
    segments = segments_for(1, T, np.random.default_rng(11)) if seg else None

    def folded(qkv):
        return attention.RoPEFlashAttention.apply(qkv, Tensor(cos), Tensor(sin), n_heads=H, n_kv_heads=Hkv,
                                              causal=True, segments=segments)

    def composed(qkv):
        q = qkv[:, :, : H * hs].reshape(1, T, H, hs)
        k = qkv[:, :, H * hs: (H + Hkv) * hs].reshape(1, T, Hkv, hs)
        v = qkv[:, :, (H + Hkv) * hs:].reshape(1, T, Hkv, hs)
        return attention.attention(rope.rope(q, cos, sin), rope.rope(k, cos, sin), v, segments, causal=True)

    assert check_grad(folded, qkv)
    ts = [Tensor(qkv.copy(), requires_grad=True) for _ in range(2)]
    outs = [f(t) for f, t in zip((folded, composed), ts)]
    np.testing.assert_allclose(outs[0].data, outs[1].data, rtol=1e-12, atol=1e-12)
    proj = np.random.default_rng(12).normal(size=outs[0].shape)
    for o in outs:
        o.backward(proj)
    np.testing.assert_allclose(ts[0].grad, ts[1].grad, rtol=1e-10, atol=1e-12)


def test_packed_attention_gradients_reach_each_projection_weight():
    """The stacked wq|wk|wv GEMM hands each weight (and the input) the gradient three separate
    projections give."""
    from llamac.engine.tensor import Tensor
    H, Hkv, hs, T, C = 4, 2, 4, 5, 8
    rng = np.random.default_rng(13)
    x0 = rng.normal(size=(2, T, C))
    w0 = [rng.normal(size=(n * hs, C)) * 0.3 for n in (H, Hkv, Hkv)]
    cos, sin = tables(T, hs)
    runs = []
    for packed in (True, False):
        x = Tensor(x0.copy(), requires_grad=True)
        ws = [Tensor(w.copy(), requires_grad=True) for w in w0]
        if packed:
            y = attention.packed_attention(x, ws, cos, sin, H, Hkv)
        else:
            q, k, v = (linear.linear(x, w).reshape(2, T, -1, hs) for w in ws)
            y = attention.attention(rope.rope(q, cos, sin), rope.rope(k, cos, sin), v, causal=True)
        (y * y).sum().backward()
        runs.append([x.grad] + [w.grad for w in ws])
    for got, want in zip(*runs):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_stacked_rows_hands_over_the_one_array_and_splits_the_gradient():
    """wq | wk | wv as consecutive row blocks of one array (Attention.after_move on the GPU): the
    packed attention's stacked weight is that array itself, and the gradient reaches each block."""
    from llamac.engine.tensor import Tensor
    H, Hkv, hs, T, C = 4, 2, 4, 5, 8
    rng = np.random.default_rng(14)
    stacked = rng.normal(size=((H + 2 * Hkv) * hs, C)) * 0.3
    views = [stacked[: H * hs], stacked[H * hs: (H + Hkv) * hs], stacked[(H + Hkv) * hs:]]
    copies = [v.copy() for v in views]
    assert linear.StackedRows.adjacent(views)
    assert not linear.StackedRows.adjacent(copies)                       # separate arrays
    assert not linear.StackedRows.adjacent([views[1], views[0], views[2]])   # out of order
    assert not linear.StackedRows.adjacent(views[:2])                    # not the whole array
    ws = [Tensor(v, requires_grad=True) for v in views]
    assert linear.StackedRows.apply(*ws, axis=0).data is stacked         # no copy
    x0 = rng.normal(size=(2, T, C))
    cos, sin = tables(T, hs)
    grads = []
    for weights in (views, copies):
        x = Tensor(x0.copy(), requires_grad=True)
        ts = [Tensor(w, requires_grad=True) for w in weights]
        y = attention.packed_attention(x, ts, cos, sin, H, Hkv)
        (y * y).sum().backward()
        grads.append([x.grad] + [t.grad for t in ts])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_attention_stacks_its_projections_only_on_the_gpu():
    from llamac.config import ModelConfig
    from llamac.model.llama import Llama
    model = Llama(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, max_seq_len=8)).to("cpu")
    att = model.layers[0].attention
    assert att.wq.weight.data.base is None or att.wq.weight.data.base is not att.wk.weight.data.base


def test_position_stride_of_views():
    from llamac.ops.rope import position_stride
    a = np.zeros((2, 5, 10, 4), np.float32)              # 6 + 2 + 2 heads of 4
    assert position_stride(a) == 40
    assert position_stride(a[:, :, :6]) == 40 and position_stride(a[:, :, 6:8]) == 40
    assert position_stride(a[:, ::2]) is None             # positions not evenly spaced across rows
    assert position_stride(a[..., :2]) is None            # a head's values not contiguous
    assert position_stride(a[:, :1, 6:8]) == 200          # one position per row: rows apart
