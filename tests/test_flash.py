"""Flash attention on the CPU: the fp32 references against a float64 naive softmax (causal,
Tq < Tk, documents, grouped-query) and the kernel's NVRTC builds. The FlashAttention Function's
output and gradients: the attention table of tests/op_cases.py (CPU and GPU)."""
import math

import numpy as np
import pytest

from llamac.engine import backend
from llamac.errors import LlamacError, ShapeError
from llamac.ops import attention, flash_backward, flash_forward
from tests.op_cases import naive64

BF16 = backend.bfloat16


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def make(B, Tq, Tk, H, Hkv, hs, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Tq, H, hs)).astype(dtype)
    k = rng.standard_normal((B, Tk, Hkv, hs)).astype(dtype)
    v = rng.standard_normal((B, Tk, Hkv, hs)).astype(dtype)
    return q, k, v


def documents(B, Tk, seed=0):
    """(B, Tk) non-decreasing document ids, a few boundaries per row (packed training data)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, Tk), np.int64)
    for b in range(B):
        cuts = rng.choice(np.arange(1, Tk), size=min(3, Tk - 1), replace=False) if Tk > 1 else []
        for c in cuts:
            seg[b, c:] += 1
    return seg


CASES = [  # B, Tq, Tk, H, Hkv, hs, causal, segments
    (2, 9, 9, 4, 4, 16, True, False),
    (2, 9, 9, 4, 2, 16, False, False),
    (1, 5, 13, 4, 1, 8, True, False),       # Tq < Tk: the KV-cache prefill
    (2, 1, 11, 2, 1, 8, True, False),       # one decode step
    (2, 17, 17, 4, 2, 16, True, True),
    (2, 6, 17, 4, 4, 16, True, True),
    (2, 17, 17, 2, 2, 16, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_reference_matches_float64(case):
    B, Tq, Tk, H, Hkv, hs, causal, use_seg = case
    q, k, v = make(B, Tq, Tk, H, Hkv, hs)
    seg = documents(B, Tk) if use_seg else None
    out, lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    want_out, want_lse, _, _ = naive64(q, k, v, causal, seg)
    assert out.dtype == np.float32 and out.shape == (B, Tq, H, hs)
    assert lse.dtype == np.float32 and lse.shape == (B, H, Tq)
    assert rel(out, want_out) < 1e-5
    assert np.max(np.abs(lse - want_lse)) < 1e-4


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_reference_matches_float64(case):
    B, Tq, Tk, H, Hkv, hs, causal, use_seg = case
    q, k, v = make(B, Tq, Tk, H, Hkv, hs)
    seg = documents(B, Tk) if use_seg else None
    dout = np.random.default_rng(5).standard_normal((B, Tq, H, hs)).astype(np.float32)
    out, lse = flash_forward.attention_forward_reference(q, k, v, causal, seg)
    dq, dk, dv = flash_forward.attention_backward_reference(q, k, v, out, dout, lse, causal, seg)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    # float64 by hand: dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)); dQ = dS K s; dK = dS^T Q s
    _, _, p, _ = naive64(q, k, v, causal, seg)
    G = H // Hkv
    q64, k64, v64, do64 = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    kx, vx = np.repeat(k64, G, axis=2), np.repeat(v64, G, axis=2)
    dvx = np.einsum("bhij,bihd->bjhd", p, do64)
    dp = np.einsum("bihd,bjhd->bhij", do64, vx)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hs)
    dq64 = np.einsum("bhij,bjhd->bihd", ds, kx)
    dkx = np.einsum("bhij,bihd->bjhd", ds, q64)
    sum_groups = lambda x: x.reshape(B, Tk, Hkv, G, hs).sum(3)  # noqa: E731
    assert rel(dq, dq64) < 1e-5
    assert rel(dk, sum_groups(dkx)) < 1e-5
    assert rel(dv, sum_groups(dvx)) < 1e-5


def test_reference_matches_fused_attention_with_bias():
    """The flash semantics are exactly the existing Attention + attention_bias (the model's mask)."""
    B, Tq, Tk, H, Hkv, hs = 2, 7, 12, 4, 2, 8
    q, k, v = make(B, Tq, Tk, H, Hkv, hs, seed=3)
    seg = documents(B, Tk, seed=3)
    bias = attention.attention_bias(np, Tq, Tk, seg, causal=True)
    want = attention.Attention().forward(q, k, v, bias)
    got, _ = flash_forward.attention_forward_reference(q, k, v, True, seg)
    assert rel(got, want) < 1e-5


def test_forward_on_cpu_falls_back_to_reference_in_input_dtype():
    q, k, v = make(1, 4, 6, 2, 1, 64, dtype=BF16)
    out, lse = flash_forward.flash_attention_forward(q, k, v, causal=True)
    want, want_lse = flash_forward.attention_forward_reference(q, k, v, causal=True)
    assert out.dtype == BF16 and lse.dtype == np.float32
    assert rel(out.astype(np.float32), want) < 1e-2 and np.allclose(lse, want_lse)
    assert not flash_forward.kernel_supports(q, k)


def test_bad_shapes_are_one_line_errors():
    q, k, v = make(1, 4, 6, 3, 2, 8)
    with pytest.raises(ShapeError, match="do not fit"):
        flash_forward.flash_attention_forward(q, k, v)
    q, k, v = make(1, 7, 6, 2, 1, 8)
    with pytest.raises(ShapeError, match="queries"):
        flash_forward.flash_attention_forward(q, k, v)
    q, k, v = make(1, 4, 6, 2, 1, 8)
    with pytest.raises(ShapeError, match="segments"):
        flash_forward.flash_attention_forward(q, k, v, segments=np.zeros((1, 4), np.int64))
    with pytest.raises(LlamacError, match="dtypes"):
        flash_forward.flash_attention_forward(q, k.astype(np.float16), v)


# ---------------------------------------------------------------- NVRTC builds, no GPU

@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is not installed")
    if not backend.nvrtc_available():
        pytest.skip(backend.nvrtc_unavailable_reason())


CONFIGS = [(hs, cfg) for hs in flash_forward.HEAD_DIMS for cfg in flash_forward.CANDIDATES[hs]]


@pytest.mark.parametrize("hs, cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
def test_kernel_builds_with_tensor_cores_and_no_spills(nvrtc, dtype, hs, cfg):
    result = backend.compile_check_kernel("flash_attn_fwd", dtype, arch="sm_90", options=(*cfg.options(hs), "--ptxas-options=-v"))
    assert result.ok, result.log
    assert "warning" not in result.log.lower(), result.log
    kind = "bf16" if dtype == BF16 else "f16"
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in result.ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in result.ptx and "cp.async.cg.shared.global" in result.ptx
    # Spilled accumulators would go through local memory on every key tile: a large slowdown.
    assert " 0 bytes spill stores" in result.log and " 0 bytes stack frame" in result.log, result.log


HOPPER = [(hs, cfg) for hs in flash_forward.HOPPER_CANDIDATES for cfg in flash_forward.HOPPER_CANDIDATES[hs]]


@pytest.mark.parametrize("hs, cfg", HOPPER, ids=str)
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
def test_hopper_kernel_builds_with_warpgroup_mma_and_no_spills(nvrtc, dtype, hs, cfg):
    assert cfg.arch == "sm_90a"
    result = backend.compile_check_kernel("flash_attn_fwd", dtype, arch=cfg.arch, options=(*cfg.options(hs), "--ptxas-options=-v"))
    assert result.ok, result.log
    assert "warning" not in result.log.lower(), result.log
    kind = "bf16" if dtype == BF16 else "f16"
    # S = Q K^T from two shared-memory descriptors; O += P V with P from registers, V transposed
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.bn}k16.f32.{kind}.{kind}" in result.ptx
    assert f"wgmma.mma_async.sync.aligned.m64n{hs}k16.f32.{kind}.{kind}" in result.ptx
    assert "fence.proxy.async.shared::cta" in result.ptx and "wgmma.wait_group.sync.aligned" in result.ptx
    assert "mma.sync" not in result.ptx and "ldmatrix" not in result.ptx
    assert " 0 bytes spill stores" in result.log and " 0 bytes stack frame" in result.log, result.log


def test_hopper_build_refuses_what_it_cannot_do(nvrtc):
    """wgmma reads one 128-byte swizzle atom per row: head size 64 only, one row tile a warp."""
    bad = flash_forward.KernelConfig(8, 1, True, 64, 2, 2, True, wgmma=True).options(128)
    result = backend.compile_check_kernel("flash_attn_fwd", BF16, arch="sm_90a", options=bad)
    assert not result.ok and "LLAMAC_WGMMA takes HEAD_DIM 64" in result.log
    # and the plain sm_90 target has no wgmma at all: the launcher must name sm_90a
    result = backend.compile_check_kernel("flash_attn_fwd", BF16, arch="sm_90", options=flash_forward.HOPPER_CONFIGS[64].options(64))
    assert not result.ok and "wgmma" in result.log


def test_default_configs_are_candidates():
    for hs in flash_forward.HEAD_DIMS:
        assert flash_forward.CONFIGS[hs] in flash_forward.CANDIDATES[hs]
        assert flash_forward.CONFIGS[hs].smem_bytes(hs, 2) <= 227 * 1024
    for hs, cfg in flash_forward.HOPPER_CONFIGS.items():
        assert cfg in flash_forward.HOPPER_CANDIDATES[hs] and cfg.wgmma and cfg.smem_bytes(hs, 2) <= 227 * 1024


def test_head_sizes_forward_and_backward_agree():
    """The model routes a head size to flash only if both kernels take it (FlashAttention.backward
    would refuse otherwise); 48 is the 15M model's dim 288 / 6 heads."""
    assert 48 in flash_forward.HEAD_DIMS and set(flash_forward.HEAD_DIMS) == set(flash_backward.HEAD_DIMS)
    assert all(hs % 16 == 0 for hs in flash_forward.HEAD_DIMS)   # k of m16n8k16


def test_shared_rows_are_padded_unless_a_multiple_of_64():
    # kernels/flash_attn_fwd.cu swizzles 128-byte rows in place and pads the others by 16 bytes
    assert [flash_forward.smem_row(hs) for hs in (32, 48, 64, 96, 128)] == [40, 56, 64, 104, 128]
    cfg = flash_forward.KernelConfig(4, 2, True, 64, 1, 2, True)
    assert cfg.smem_bytes(48, 2) == (128 + 2 * 2 * 64) * 56 * 2
    assert cfg.smem_bytes(64, 2) == (128 + 2 * 2 * 64) * 64 * 2


def test_use_flash_takes_the_new_head_sizes(monkeypatch):
    class FakeXP:  # stands in for CuPy: use_flash only asks whether the module is NumPy
        pass

    monkeypatch.setattr(backend, "get_array_module", lambda a: FakeXP)
    x = np.zeros((1, 4, 6, 48), BF16)
    assert attention.use_flash(x, 48) and attention.use_flash(x, 32) and attention.use_flash(x, 96)
    assert not attention.use_flash(x, 40) and not attention.use_flash(x.astype(np.float32), 48)
    assert flash_forward.kernel_supports(x) and not flash_forward.kernel_supports(np.zeros((1, 4, 6, 40), BF16))


def test_fp32_build_is_a_trapping_stub(nvrtc):
    result = backend.compile_check_kernel("flash_attn_fwd", np.float32, arch="sm_90")
    assert result.ok and "trap;" in result.ptx and "mma.sync" not in result.ptx


def test_launcher_grid_and_kernel_cache_without_a_gpu(monkeypatch):
    """The launch path with stand-ins for CuPy: one compile per (dtype, hs, config, device), the
    grid (B * H, query blocks), the CTA size and shared memory of the head size's config."""

    class Device:
        id = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeArray:  # what the launcher reads of a CuPy array
        def __init__(self, a):
            self.a, self.device, self.data = a, Device(), type("Ptr", (), {"ptr": 4096})()

        def __getattr__(self, name):
            return getattr(self.a, name)

    class FakeXP:
        empty = staticmethod(lambda shape, dtype: FakeArray(np.empty(shape, dtype)))
        ascontiguousarray = staticmethod(lambda a, dtype=None: a)
        asarray = staticmethod(lambda a: a)

    launches, compiles = [], []

    class Kernel:
        def __call__(self, grid, block, args, shared_mem=0):
            launches.append((grid, block, len(args), shared_mem))

    monkeypatch.setattr(flash_forward, "kernel_supports", lambda q, k=None: True)
    monkeypatch.setattr(flash_forward, "_KERNELS", {})
    monkeypatch.setattr(backend, "get_array_module", lambda a: FakeXP)
    monkeypatch.setattr(backend, "get_kernel",
                        lambda *a, options=(), arch=None, **k: compiles.append((options, arch)) or Kernel())
    for capability in ("80", "90"):   # an A100, then an H100: hs=64 takes the wgmma build there
        monkeypatch.setattr(backend, "compute_capability", lambda device_id=0: capability)
        for hs in flash_forward.HEAD_DIMS:
            cfg = flash_forward.HOPPER_CONFIGS[hs] if capability == "90" and hs in flash_forward.HOPPER_CONFIGS else flash_forward.CONFIGS[hs]
            q = FakeArray(np.zeros((2, 300, 8, hs), BF16))
            k = FakeArray(np.zeros((2, 300, 2, hs), BF16))
            for _ in range(3):
                out, lse = flash_forward.flash_attention_forward(q, k, k, segments=np.zeros((2, 300), np.int32))
            assert out.shape == (2, 300, 8, hs) and lse.shape == (2, 8, 300)
            assert launches[-1] == ((16, -(-300 // cfg.block_m)), (32 * cfg.warps,), 21, cfg.smem_bytes(hs, 2))
            assert (cfg.options(hs), "sm_90a" if cfg.wgmma else None) in compiles
            assert flash_forward._KERNELS[(BF16, hs, cfg, 0)].max_dynamic_shared_size_bytes == cfg.smem_bytes(hs, 2)
    # one compile per distinct (dtype, hs, config): the Hopper pass reuses every non-wgmma build
    assert len(compiles) == len(flash_forward.HEAD_DIMS) + len(flash_forward.HOPPER_CONFIGS)
