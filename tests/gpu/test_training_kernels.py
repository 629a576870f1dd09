"""The training kernels (RMSNorm, RoPE, embedding backward, cross-entropy, AdamW) on the GPU against
their NumPy references, at awkward sizes: not multiples of the 16-byte pack or the block, one
position (T=1), long rows, and operands that start mid-allocation (the scalar paths). The ops through
their Functions, and the AdamW step, against float64 on both backends: tests/op_cases.py."""
import numpy as np
import pytest

import llamac
from llamac import runtime
from llamac.engine import backend
from llamac.engine.tensor import Tensor
from llamac.ops import cross_entropy, embedding, rmsnorm, rope
from llamac.train.optim import AdamW


BF16 = backend.bfloat16
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
# Kernel vs reference (same rounded inputs, both fp32 inside), max|got - want| / max|want|:
# outputs in a 16-bit dtype differ by about one unit in the last place.
TOL = {np.dtype(np.float32): 2e-5, BF16: 1e-2, np.dtype(np.float16): 2e-3}
FP32_TOL = 1e-4     # fp32 results (rstd, dw, loss, lse): only the summation order differs


def rel_err(got, want) -> float:
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


def on_gpu(host: np.ndarray, offset: int = 0):
    """host on the GPU as a C-contiguous view `offset` elements into its allocation (offset 1: misaligned)."""
    cp = backend.cupy_module()
    flat = np.empty(host.size + offset, host.dtype)
    flat[offset:] = host.ravel()
    return cp.asarray(flat)[offset:].reshape(host.shape)


def normal(shape, dtype, seed, std=1.0):
    return (np.random.default_rng(seed).normal(0, std, shape)).astype(np.float32).astype(dtype)


def check(got, want, tol, what):
    host = backend.to_numpy(got)
    assert not np.isnan(host.astype(np.float32)).any(), f"{what}: NaN in the output"
    err = rel_err(host, want)
    assert err <= tol, f"{what}: rel err {err:.3g} > {tol}"


# ---------------------------------------------------------------- RMSNorm

RMS_SHAPES = [(1, 8), (7, 129), (3, 1, 1000), (2, 5, 768), (9, 2048), (33, 4096), (4, 13000)]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
def test_rmsnorm_kernels(shape, dtype, offset, cache, monkeypatch):
    monkeypatch.setattr(runtime.options(), "rmsnorm_register_cache", cache)     # rows kept in registers, or read twice
    dtype = DTYPES[dtype]
    x, d = normal(shape, dtype, 0, 2.0), normal(shape, dtype, 1)
    w = (1 + normal(shape[-1:], np.float32, 2, 0.3)).astype(dtype)
    y, rstd = rmsnorm.rmsnorm_forward(on_gpu(x, offset), on_gpu(w))
    want_y, want_rstd = rmsnorm.rmsnorm_forward_reference(x, w)
    assert y.shape == shape and y.dtype == dtype and rstd.dtype == np.float32
    check(y, want_y, TOL[dtype], "rmsnorm_forward y")
    check(rstd, want_rstd, FP32_TOL, "rmsnorm_forward rstd")
    dx, dw = rmsnorm.rmsnorm_backward(on_gpu(d, offset), on_gpu(x, offset), on_gpu(w), rstd)
    want_dx, want_dw = rmsnorm.rmsnorm_backward_reference(d, x, w, want_rstd)
    assert dx.dtype == dtype and dw.dtype == np.float32 and dw.shape == shape[-1:]
    check(dx, want_dx, TOL[dtype], "rmsnorm_backward dx")
    check(dw, want_dw, FP32_TOL, "rmsnorm_backward dw")


def test_rmsnorm_weight_gradient_is_deterministic():
    x, d = on_gpu(normal((4099, 768), BF16, 3)), on_gpu(normal((4099, 768), BF16, 4))
    w = on_gpu(normal((768,), BF16, 5))
    _, rstd = rmsnorm.rmsnorm_forward(x, w)
    first = backend.to_numpy(rmsnorm.rmsnorm_backward(d, x, w, rstd)[1])
    for _ in range(3):
        assert np.array_equal(backend.to_numpy(rmsnorm.rmsnorm_backward(d, x, w, rstd)[1]), first)


# ---------------------------------------------------------------- RoPE

ROPE_SHAPES = [(1, 1, 1, 2), (2, 7, 3, 8), (1, 1, 2, 6), (2, 33, 5, 64), (1, 300, 3, 130)]


@pytest.mark.parametrize("table", ["fp32", "same"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_rope_kernels(shape, dtype, offset, table):
    dtype = DTYPES[dtype]
    B, T, H, hs = shape
    ang = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hs, 2) / hs))[None]
    tdt = np.float32 if table == "fp32" else dtype
    cos, sin = np.cos(ang).astype(tdt), np.sin(ang).astype(tdt)
    x = normal(shape, dtype, 6)
    out = rope.rope_forward(on_gpu(x, offset), on_gpu(cos), on_gpu(sin))
    assert out.shape == shape and out.dtype == dtype
    check(out, rope.rope_reference(x, cos, sin), TOL[dtype], "rope_forward")
    back = rope.rope_backward(on_gpu(x, offset), on_gpu(cos), on_gpu(sin))
    check(back, rope.rope_reference(x, cos, sin, -1.0), TOL[dtype], "rope_backward")
    if dtype == np.float32:   # the backward undoes the forward (a rotation)
        check(rope.rope_backward(out, on_gpu(cos), on_gpu(sin)), x, 1e-5, "rope round trip")


# ---------------------------------------------------------------- embedding backward

EMB_CASES = [(1, 1, 5), (17, 129, 6), (1000, 768, 10), (4096, 768, 50000), (300, 64, 1)]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, V", EMB_CASES, ids=str)
def test_embedding_backward_kernel(N, C, V, dtype, offset):
    dtype = DTYPES[dtype]
    ids = np.random.default_rng(7).integers(0, V, N)
    d = normal((N, C), dtype, 8)
    got = embedding.embedding_backward(on_gpu(ids), on_gpu(d, offset), V)
    assert got.shape == (V, C) and got.dtype == dtype
    check(got, embedding.embedding_backward_reference(ids, d, V), TOL[dtype], "embedding_backward")


def test_embedding_backward_is_deterministic_and_skips_bad_ids():
    rng = np.random.default_rng(9)
    ids = rng.integers(0, 7, (8, 1000))              # every row of dW is a long sum of repeats
    d = on_gpu(normal((8, 1000, 96), np.float32, 10, 100.0))
    first = backend.to_numpy(embedding.embedding_backward(on_gpu(ids), d, 7))
    for _ in range(3):
        assert np.array_equal(backend.to_numpy(embedding.embedding_backward(on_gpu(ids), d, 7)), first)
    bad = ids.copy()
    bad[0, :10] = [-1, 7, 100, -5, 3, 3, 7, 8, -100, 2]
    keep = (bad >= 0) & (bad < 7)
    want = embedding.embedding_backward_reference(bad[keep], backend.to_numpy(d)[keep], 7)
    check(embedding.embedding_backward(on_gpu(bad), d, 7), want, 1e-5, "embedding_backward, ids out of range")


# ---------------------------------------------------------------- cross-entropy

CE_SHAPES = [(1, 5), (7, 1001), (3, 4, 32000), (1, 1, 3), (2, 70000)]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
def test_cross_entropy_kernels(shape, dtype, offset):
    dtype = DTYPES[dtype]
    V = shape[-1]
    logits = normal(shape, dtype, 11, 3.0)
    targets = np.random.default_rng(12).integers(0, V, shape[:-1])
    targets.reshape(-1)[::3] = -100
    loss, lse = cross_entropy.cross_entropy_forward(on_gpu(logits, offset), on_gpu(targets))
    want_loss, want_lse = cross_entropy.cross_entropy_forward_reference(logits, targets)
    check(lse, want_lse, FP32_TOL, "cross_entropy_forward lse")
    check(loss, want_loss, FP32_TOL, "cross_entropy_forward loss")
    assert np.all(backend.to_numpy(loss)[targets.reshape(-1) == -100] == 0)
    scale = backend.cupy_module().full(1, 0.37, np.float32)
    got = cross_entropy.cross_entropy_backward(on_gpu(logits, offset), on_gpu(targets), lse, scale)
    assert got.shape == shape and got.dtype == dtype
    want = cross_entropy.cross_entropy_backward_reference(logits, targets, want_lse, 0.37)
    check(got, want, TOL[dtype], "cross_entropy_backward")
    in_place = on_gpu(logits, offset)
    assert cross_entropy.cross_entropy_backward(in_place, on_gpu(targets), lse, 0.37, out=in_place) is in_place
    assert np.array_equal(backend.to_numpy(in_place), backend.to_numpy(got))


def test_cross_entropy_masked_logits_and_all_ignored():
    logits = np.full((3, 40), -np.inf, np.float32)
    logits[:, :5] = np.random.default_rng(13).normal(size=(3, 5))
    targets = np.array([1, 4, 0])
    loss, lse = cross_entropy.cross_entropy_forward(on_gpu(logits), on_gpu(targets))
    check(loss, cross_entropy.cross_entropy_forward_reference(logits[:, :5], targets)[0], 1e-5, "masked logits")
    d = cross_entropy.cross_entropy_backward(on_gpu(logits), on_gpu(targets), lse, 1.0)
    assert np.all(backend.to_numpy(d)[:, 5:] == 0)
    loss, _ = cross_entropy.cross_entropy_forward(on_gpu(logits), on_gpu(np.full(3, -100)))
    assert np.all(backend.to_numpy(loss) == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_function_on_gpu_overwrite_matches(dtype):
    from llamac.ops.cross_entropy import CrossEntropy
    logits = normal((2, 9, 1003), np.float32, 14, 2.0)
    targets = np.random.default_rng(15).integers(0, 1003, (2, 9))
    targets[0, :4] = -100
    grads = []
    for overwrite in (False, True):
        x = llamac.tensor(logits, dtype=dtype, device="cuda", requires_grad=True)
        h = x * 1.0                      # a non-leaf whose buffer the backward may take over
        loss = CrossEntropy.apply(h, Tensor(on_gpu(targets)), overwrite_logits=overwrite)
        loss.backward()
        grads.append(backend.to_numpy(x.grad).astype(np.float32))
    # the same rounded logits in fp32 on the CPU (a CPU bf16 tensor would round the loss to bf16)
    ref = llamac.tensor(logits.astype(DTYPES[dtype]).astype(np.float32), requires_grad=True)
    want = llamac.cross_entropy(ref, llamac.tensor(targets))
    want.backward()
    assert abs(float(loss.item()) - float(want.item())) <= 1e-4 * abs(float(want.item()))
    assert np.array_equal(grads[0], grads[1])
    assert rel_err(grads[0], ref.grad) <= TOL[DTYPES[dtype]]


# ---------------------------------------------------------------- AdamW

def _params(dtype, device, seed=16):
    rng = np.random.default_rng(seed)
    shapes = {"tok_embeddings.weight": (37, 24), "layers.0.attention.wq.weight": (24, 24),
              "layers.0.attention_norm.weight": (24,), "layers.0.feed_forward.w1.weight": (70001,),
              "layers.0.feed_forward.w2.weight": (3, 16385), "unused.weight": (5, 5), "norm.weight": (1,)}
    named = []
    for name, shape in shapes.items():
        p = llamac.tensor(rng.normal(0, 0.5, shape).astype(np.float32), dtype=dtype, device=device,
                          requires_grad=True)
        if name != "unused.weight":
            p.grad = backend.to_device(rng.normal(0, 2.0, shape).astype(np.float32).astype(p.dtype), device)
        named.append((name, p))
    return named


@pytest.mark.parametrize("clip", [None, 0.5, 1e9])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_adamw_steps_in_place_through_the_kernels(dtype, clip):
    """The GPU step takes kernels/adamw.cu's multi-tensor path and leaves every parameter where it was
    (a captured CUDA graph holds their addresses). Its numbers: the AdamW table of tests/op_cases.py."""
    gpu = _params(dtype, "cuda")
    g_opt = AdamW(gpu, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    addresses = [p.data.data.ptr for _, p in gpu]
    for step in range(3):
        g_norm = g_opt.step(lr=3e-3 * (step + 1), clip=clip)
        assert backend.device_of(g_norm) == "cuda" and g_norm.shape == ()
    assert g_opt._fused is not None, "the GPU step did not take the fused kernel path"
    assert [p.data.data.ptr for _, p in gpu] == addresses, "a parameter moved: a captured graph would break"


def test_fused_adamw_takes_strided_gradients():
    gpu, cpu = _params("float32", "cuda"), _params("float32", "cpu")
    cp = backend.cupy_module()
    for named in (gpu, cpu):
        p = named[1][1]
        xp = p.xp
        p.grad = xp.broadcast_to(xp.asarray(np.float32(0.25)), p.shape)     # e.g. from a sum's backward
    g3 = np.random.default_rng(17).normal(size=gpu[3][1].shape).astype(np.float32)
    gpu[3][1].grad, cpu[3][1].grad = on_gpu(g3, 1), g3            # contiguous but not 16-byte aligned
    AdamW(gpu, lr=1e-2).step(clip=1.0)
    AdamW(cpu, lr=1e-2).step(clip=1.0)
    for (name, gp), (_, c) in zip(gpu, cpu):
        check(gp.data, c.data, 1e-5, name)
    assert isinstance(gpu[1][1].data, cp.ndarray)
