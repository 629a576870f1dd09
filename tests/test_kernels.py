"""The CUDA kernel path without a GPU: NVRTC compile checks (CI) and the NumPy references. The kernels
against those references run in tests/gpu/test_kernels.py and tests/gpu/test_training_kernels.py."""
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from llamac.engine import backend
from llamac.errors import LlamacError, ShapeError
from llamac.ops import common, cross_entropy, embedding, rmsnorm, rope, swiglu
from llamac.train import optim
from tests import op_cases

BF16 = backend.bfloat16
KERNEL_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
# Kernel vs reference, max|got - want| / max|want|: both compute in fp32 and
# round once, so 16-bit outputs differ by at most one unit in the last place.
TOL = {np.dtype(np.float32): 1e-5, BF16: 1e-2, np.dtype(np.float16): 1e-3}


def rel_err(got, want) -> float:
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


# A test-only kernel over common.cuh's conversions, checked bit for bit on the
# GPU against NumPy/ml_dtypes casts, and compiled in CI with the real kernels.
CONVERT_SOURCE = textwrap.dedent("""
    extern "C" __global__ void narrow(const float* in, DTYPE* out, long long n) {
        for (long long i = global_thread_id(); i < n; i += grid_stride()) store_f(out + i, in[i]);
    }
    extern "C" __global__ void widen(const DTYPE* in, float* out, long long n) {
        for (long long i = global_thread_id(); i < n; i += grid_stride()) out[i] = load_f(in + i);
    }
""")


def convert_source() -> str:
    return (backend.KERNEL_DIR / "common.cuh").read_text() + "\n#line 1 \"convert_test.cu\"\n" + CONVERT_SOURCE


# ================================================================ (a) NVRTC compile checks, no GPU

@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is not installed (pip install cuda-bindings nvidia-cuda-nvrtc)")
    if not backend.nvrtc_available():
        pytest.skip(backend.nvrtc_unavailable_reason())


def assert_compiles(result, what):
    assert result.ok, f"NVRTC failed to compile {what}:\n{result.log}"
    # Warnings are usually real bugs in kernels (narrowing, unused results); keep the log empty.
    assert "warning" not in result.log.lower(), f"NVRTC warnings for {what}:\n{result.log}"


def test_there_are_kernels():
    assert "swiglu" in backend.kernel_names()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", backend.kernel_names())
def test_kernel_compiles_for_sm90(nvrtc, name, dtype):
    result = backend.compile_check_kernel(name, KERNEL_DTYPES[dtype], arch="sm_90")
    assert_compiles(result, f"kernels/{name}.cu with DTYPE={backend.CUDA_TYPES[KERNEL_DTYPES[dtype]]}")


def _kernel_functions() -> dict:
    """Every op module's SOURCES, merged: each kernels/*.cu beside the entry points it must export."""
    from llamac.infer import decode
    from llamac.ops import cross_entropy, embedding, flash_backward, flash_forward, rmsnorm, rope, swiglu
    from llamac.train import optim
    merged = {}
    for module in (swiglu, rmsnorm, rope, embedding, cross_entropy, flash_forward, flash_backward, optim, decode):
        merged.update(module.SOURCES)
    return merged


KERNEL_FUNCTIONS = _kernel_functions()


def test_every_kernel_source_belongs_to_an_op():
    assert set(KERNEL_FUNCTIONS) == {p.stem for p in backend.KERNEL_DIR.glob("*.cu")}


@pytest.mark.parametrize("name", sorted(KERNEL_FUNCTIONS))
def test_kernel_exports_the_launchers_functions(nvrtc, name):
    result = backend.compile_check_kernel(name, np.float32, arch="sm_90")
    assert_compiles(result, f"kernels/{name}.cu")
    for function in KERNEL_FUNCTIONS[name]:
        assert f".entry {function}(" in result.ptx, f"kernels/{name}.cu has no extern \"C\" __global__ {function}"


def test_swiglu_uses_128_bit_loads_and_stores(nvrtc):
    # The vectorized path is the point of the kernel: 16-bit types only reach
    # DRAM bandwidth with 16-byte accesses, so losing them is a regression.
    ptx = backend.compile_check_kernel("swiglu", BF16, arch="sm_90").ptx
    assert "ld.global.nc.v4.u32" in ptx and "st.global.v4.u32" in ptx


@pytest.mark.parametrize("name", ["rmsnorm", "rope", "embedding", "cross_entropy"])
def test_training_kernels_use_128_bit_loads_and_stores(nvrtc, name):
    ptx = backend.compile_check_kernel(name, BF16, arch="sm_90").ptx
    assert "ld.global.nc.v4.u32" in ptx or "ld.global.v4.u32" in ptx, name
    assert "st.global.v4.u32" in ptx or "st.global.v4.b32" in ptx, name


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_rope_kernel_compiles_with_tables_in_the_model_dtype(nvrtc, dtype):
    result = backend.compile_check_kernel("rope", KERNEL_DTYPES[dtype], options=("-DROPE_TABLE_IN_DTYPE",))
    assert_compiles(result, f"kernels/rope.cu -DROPE_TABLE_IN_DTYPE with {dtype}")


def test_adamw_chunk_matches_the_kernel():
    assert f"#define ADAMW_CHUNK {optim.ADAMW_CHUNK}" in (backend.KERNEL_DIR / "adamw.cu").read_text()
    assert f"#define ADAMW_TABLE {optim.ADAMW_TABLE}" in (backend.KERNEL_DIR / "adamw.cu").read_text()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_conversion_test_kernel_compiles(nvrtc, dtype):
    result = backend.compile_check(convert_source(), backend.kernel_options(KERNEL_DTYPES[dtype]), name="convert_test.cu")
    assert_compiles(result, f"the conversion test kernel with DTYPE={dtype}")


def test_compile_check_fails_on_a_broken_kernel(nvrtc, tmp_path, monkeypatch):
    # The same path the CI check uses, pointed at a kernels/ folder with a bug in it.
    (tmp_path / "common.cuh").write_text((backend.KERNEL_DIR / "common.cuh").read_text())
    (tmp_path / "broken.cu").write_text(textwrap.dedent("""
        extern "C" __global__ void broken(const DTYPE* x, DTYPE* y, long long n) {
            store_f(y, load_f(x) * undefined_scale);
        }
    """))
    monkeypatch.setattr(backend, "KERNEL_DIR", tmp_path)
    result = backend.compile_check_kernel("broken", BF16)
    assert not result.ok
    assert "undefined_scale" in result.log and "broken.cu" in result.log, result.log
    print(result.log)


def test_compile_check_runs_ptxas_for_sm_targets(nvrtc):
    # Invalid inline PTX gets past the front end and only fails in ptxas, so
    # this passes for a virtual target and must fail for a real one.
    source = 'extern "C" __global__ void k(float* p) { asm volatile("llamac_bogus_op;"); }'
    assert backend.compile_check(source, arch="compute_90").ok
    result = backend.compile_check(source, arch="sm_90")
    assert not result.ok and "ptxas" in result.log and "llamac_bogus_op" in result.log, result.log


def test_compile_check_demands_a_dtype(nvrtc):
    result = backend.compile_check((backend.KERNEL_DIR / "common.cuh").read_text(), ("--std=c++17",))
    assert not result.ok and "DDTYPE" in result.log


def test_compile_check_without_nvrtc_says_why(monkeypatch):
    monkeypatch.setattr(backend, "_nvrtc_or_reason", lambda: (None, "cuda.bindings is not importable"))
    with pytest.raises(LlamacError, match="cuda.bindings is not importable"):
        backend.compile_check('extern "C" __global__ void k() {}')


# ================================================================ (c) the references, CPU

@pytest.mark.parametrize("dtype", op_cases.SWIGLU_REFERENCE_TOL)
def test_references_match_float64_formula(dtype):
    op_cases.run_swiglu_reference_case(dtype, "cpu")     # on CuPy: tests/gpu/test_kernels.py


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_references_are_safe_for_large_inputs(dtype):
    gate = np.array([-1e4, -1000, -100, -89, -20, -0.0, 0, 20, 89, 100, 1000, 1e4], np.float32)
    if np.dtype(dtype) == np.float16:
        gate = gate[np.abs(gate) < 65504]
    gate = gate.astype(dtype)
    up = np.full(gate.shape, 0.5, dtype)
    dout = np.ones(gate.shape, dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = swiglu.swiglu_forward_reference(gate, up)
        dgate, dup = swiglu.swiglu_backward_reference(gate, up, dout)
    g = gate.astype(np.float64)
    for got in (out, dgate, dup):
        assert np.all(np.isfinite(got.astype(np.float64)))
    big = np.abs(g) >= 89
    # silu(x) -> x for x >> 0 and -> 0 for x << 0; its slope -> 1 and -> 0.
    np.testing.assert_allclose(out.astype(np.float64)[big], np.where(g > 0, 0.5 * g, 0.0)[big], rtol=1e-2, atol=1e-30)
    np.testing.assert_allclose(dgate.astype(np.float64)[big], np.where(g > 0, 0.5, 0.0)[big], atol=1e-6)


def test_backward_reference_matches_finite_differences():
    rng = np.random.default_rng(2)
    gate, up, dout = (rng.normal(0, 2, 4001) for _ in range(3))
    gate[:6] = [-30, -5, -1e-3, 0, 1e-3, 30]
    h = 1e-6

    def loss_terms(g, u):  # elementwise, so one perturbation of every entry gives every partial
        return dout * swiglu.swiglu_forward_reference(g, u)

    num_dgate = (loss_terms(gate + h, up) - loss_terms(gate - h, up)) / (2 * h)
    num_dup = (loss_terms(gate, up + h) - loss_terms(gate, up - h)) / (2 * h)
    dgate, dup = swiglu.swiglu_backward_reference(gate, up, dout)
    np.testing.assert_allclose(dgate, num_dgate, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dup, num_dup, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- launchers on NumPy: the reference, checked operands

def test_launchers_fall_back_to_reference_on_numpy():
    rng = np.random.default_rng(3)
    gate, up, dout = (rng.normal(size=(5, 6)).astype(BF16) for _ in range(3))
    assert np.array_equal(swiglu.swiglu_forward(gate, up), swiglu.swiglu_forward_reference(gate, up))
    for got, want in zip(swiglu.swiglu_backward(gate, up, dout), swiglu.swiglu_backward_reference(gate, up, dout)):
        assert np.array_equal(got, want)
    out = np.full(gate.shape, np.nan, BF16)
    assert swiglu.swiglu_forward(gate, up, out=out) is out
    assert np.array_equal(out, swiglu.swiglu_forward_reference(gate, up))


def test_launchers_check_operands():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ShapeError, match=r"\(2, 3\)"):
        swiglu.swiglu_forward(a, np.ones((3, 2), np.float32))
    with pytest.raises(LlamacError, match="dtypes must match"):
        swiglu.swiglu_forward(a, a.astype(np.float16))
    with pytest.raises(LlamacError, match="floating-point"):
        swiglu.swiglu_forward(a.astype(np.int32), a.astype(np.int32))
    with pytest.raises(LlamacError, match="must be a NumPy or CuPy array"):
        swiglu.swiglu_forward([1.0], [1.0])
    with pytest.raises(ShapeError):
        swiglu.swiglu_backward(a, a, a, dgate=np.empty((6,), np.float32))


def fake_array(dtype, ptr):
    return types.SimpleNamespace(dtype=np.dtype(dtype), data=types.SimpleNamespace(ptr=ptr))


def test_launch_config():
    f32, bf16 = [fake_array(np.float32, 256)], [fake_array(BF16, 256)]
    assert common._launch_config(1, f32) == ((1,), (256,))
    assert common._launch_config(10**9, f32) == ((common.MAX_BLOCKS,), (256,))
    # aligned: one thread per 16-byte pack; misaligned: one per element
    assert common._launch_config(1_000_003, bf16) == ((489,), (256,))  # ceil(ceil(n / 8) / 256)
    assert common._launch_config(1_000_003, bf16 + [fake_array(BF16, 258)]) == ((3907,), (256,))  # ceil(n / 256)


def test_modules_import_and_refuse_cleanly_without_cupy():
    # Run where `import cupy` fails, whatever this machine has installed.
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None
        import llamac.bench.kernels
        from llamac.ops import (attention, common, cross_entropy, embedding, flash_backward, flash_forward,
                                linear, rmsnorm, rope, swiglu)
        from llamac.errors import LlamacError
        for call in (llamac.bench.kernels.bench_swiglu, llamac.bench.kernels.measure_copy_bandwidth,
                     llamac.bench.kernels.bench_training_kernels):
            try:
                call()
            except LlamacError as exc:
                assert "needs a CUDA GPU" in str(exc), exc
            else:
                raise AssertionError(f"{call.__name__} ran without CUDA")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_compile_check_leaves_python_bytes_alone(nvrtc):
    # Regression: NVRTC once wrote its (empty) log into CPython's shared b" " object,
    # after which every b" " in the process was a NUL byte and tokenizers spelled spaces as \x00.
    backend.compile_check_kernel("swiglu", np.float32)
    assert " ".encode()[0] == 32 and (b" " * 1)[0] == 32   # (bytes([32]) is that same object)


# ================================================================ the training kernels' references, CPU (float64)

def numeric_grad(f, x, h=1e-6):
    """d sum(f(x)) / dx by central differences, one entry at a time (small x only)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def test_rmsnorm_references_match_float64():
    rng = np.random.default_rng(20)
    x, w, d = rng.normal(size=(2, 3, 9)), rng.normal(size=9), rng.normal(size=(2, 3, 9))
    y, rstd = rmsnorm.rmsnorm_forward_reference(x, w, eps=1e-5)
    want_rstd = 1 / np.sqrt((x * x).mean(-1) + 1e-5)
    np.testing.assert_allclose(rstd, want_rstd.reshape(-1), rtol=1e-13)
    np.testing.assert_allclose(y, x * want_rstd[..., None] * w, rtol=1e-13)
    dx, dw = rmsnorm.rmsnorm_backward_reference(d, x, w, rstd)
    np.testing.assert_allclose(dx, numeric_grad(lambda a: (rmsnorm.rmsnorm_forward_reference(a, w)[0] * d).sum(), x),
                               atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(lambda a: (rmsnorm.rmsnorm_forward_reference(x, a)[0] * d).sum(), w),
                               atol=1e-7)
    # the launchers on NumPy are the references; bf16 computes in fp32 and rounds once
    xb, wb = x.astype(BF16), w.astype(BF16)
    yb, rb = rmsnorm.rmsnorm_forward(xb, wb)
    assert yb.dtype == BF16 and rb.dtype == np.float32
    assert rel_err(yb, rmsnorm.rmsnorm_forward_reference(xb.astype(np.float64), wb.astype(np.float64))[0]) <= 1e-2


def test_rope_reference_is_the_fused_rotation_and_its_inverse():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(2, 5, 3, 8))
    ang = rng.normal(size=(5, 4))
    cos, sin = np.cos(ang), np.sin(ang)
    out = rope.rope_forward(x, cos, sin)
    np.testing.assert_allclose(out, rope._rotate(x, cos, sin, 1.0), rtol=1e-14, atol=1e-15)
    # pair i of position t is the complex number x[2i] + i x[2i+1] times e^(i angle)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[None, :, None, :]
    np.testing.assert_allclose(out[..., 0::2], z.real, atol=1e-13)
    np.testing.assert_allclose(out[..., 1::2], z.imag, atol=1e-13)
    np.testing.assert_allclose(rope.rope_backward(out, cos, sin), x, atol=1e-13)
    with pytest.raises(ShapeError, match="want"):
        rope.rope_forward(x, cos[:4], sin[:4])


def test_embedding_backward_reference_sums_repeats():
    rng = np.random.default_rng(22)
    ids = rng.integers(0, 6, (3, 7))
    d = rng.normal(size=(3, 7, 5))
    want = np.zeros((6, 5))
    for j, i in enumerate(ids.reshape(-1)):
        want[i] += d.reshape(-1, 5)[j]
    np.testing.assert_allclose(embedding.embedding_backward(ids, d, 6), want, rtol=1e-14)
    assert embedding.embedding_backward(ids, d.astype(BF16), 6).dtype == BF16
    with pytest.raises(LlamacError, match="integers"):
        embedding.embedding_backward(ids.astype(np.float32), d, 6)


def test_cross_entropy_references_match_float64():
    rng = np.random.default_rng(23)
    logits = rng.normal(0, 3, (2, 3, 11))
    targets = rng.integers(0, 11, (2, 3))
    targets[1, 2] = -100
    loss, lse = cross_entropy.cross_entropy_forward(logits, targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.where(targets < 0, 0, targets)[..., None], -1)[..., 0]
    want[1, 2] = 0
    np.testing.assert_allclose(loss, want.reshape(-1), rtol=1e-13)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(-1)).reshape(-1), rtol=1e-13)
    d = cross_entropy.cross_entropy_backward(logits, targets, lse, 0.25)
    num = numeric_grad(lambda a: cross_entropy.cross_entropy_forward(a, targets)[0].sum() * 0.25, logits)
    np.testing.assert_allclose(d, num, atol=1e-8)
    assert np.all(d[1, 2] == 0)
    out = np.empty_like(logits)
    assert cross_entropy.cross_entropy_backward(logits, targets, lse, 0.25, out=out) is out
    # the GPU-path loss (mean over counted rows) equals the ops.CrossEntropy CPU value
    import llamac
    ce = llamac.cross_entropy(llamac.tensor(logits.astype(np.float32)), llamac.tensor(targets)).item()
    assert abs(loss.sum() / 5 - ce) <= 1e-5 * abs(ce)
    with pytest.raises(ShapeError, match="do not fit"):
        cross_entropy.cross_entropy_forward(logits, targets[:, :2])
