"""The CUDA kernels of tests/test_kernels.py on the GPU: SwiGLU forward and backward against the NumPy
references at awkward sizes and layouts (16-byte packs, misaligned operands, outputs poisoned with NaN),
the GPU launchers' operand checks, common.cuh's conversions bit for bit, and 64-bit indexing."""
import numpy as np
import pytest

from llamac.engine import backend
from llamac.errors import DeviceError, LlamacError
from llamac.ops import swiglu
from tests import op_cases
from tests.test_kernels import KERNEL_DTYPES, TOL, convert_source, rel_err

SIZES = [1, 7, 255, 257, 1_000_003, (3, 17, 689)]
# aligned: the 16-byte-pack path; offset: every operand starts one element into
# its allocation (the scalar path); out_offset: only the outputs do.
LAYOUTS = ["aligned", "offset", "out_offset"]


def on_gpu(host: np.ndarray, offset: int):
    """host copied to the GPU as a C-contiguous view starting `offset` elements into its allocation."""
    cp = backend.cupy_module()
    flat = np.empty(host.size + offset, host.dtype)
    flat[offset:] = host.ravel()
    dev = cp.asarray(flat)[offset:].reshape(host.shape)
    assert dev.flags.c_contiguous and (dev.data.ptr % 16 == 0) == (offset == 0)
    return dev


def make_inputs(shape, dtype, count, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 3, shape).astype(np.float32) for _ in range(count)]
    flat = arrays[0].reshape(-1)
    extremes = np.array([-90, 90, -30, 30, 0, -0.0, 1e-3, -1e-3], np.float32)
    flat[: min(flat.size, extremes.size)] = extremes[: flat.size]  # the gate's tails, in every size
    return [a.astype(dtype) for a in arrays]


def poisoned(shape, dtype, offset):
    return on_gpu(np.full(shape, np.nan, dtype), offset)


def assert_close(got, want, dtype, what):
    got = backend.to_numpy(got)
    unwritten = int(np.isnan(got.astype(np.float32)).sum())
    assert unwritten == 0, f"{what}: {unwritten} of {got.size} outputs still NaN (never written)"
    err = rel_err(got, want)
    assert err <= TOL[np.dtype(dtype)], f"{what}: rel err {err:.3g} > {TOL[np.dtype(dtype)]}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_swiglu_forward_kernel(shape, dtype, layout):
    dtype = KERNEL_DTYPES[dtype]
    in_off, out_off = {"aligned": (0, 0), "offset": (1, 1), "out_offset": (0, 1)}[layout]
    gate, up = make_inputs(shape, dtype, 2)
    out = poisoned(gate.shape, dtype, out_off)
    got = swiglu.swiglu_forward(on_gpu(gate, in_off), on_gpu(up, in_off), out=out)
    assert got is out
    assert_close(out, swiglu.swiglu_forward_reference(gate, up), dtype, "swiglu_forward")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_swiglu_backward_kernel(shape, dtype, layout):
    dtype = KERNEL_DTYPES[dtype]
    in_off, out_off = {"aligned": (0, 0), "offset": (1, 1), "out_offset": (0, 1)}[layout]
    gate, up, dout = make_inputs(shape, dtype, 3)
    dgate, dup = poisoned(gate.shape, dtype, out_off), poisoned(gate.shape, dtype, out_off)
    swiglu.swiglu_backward(*(on_gpu(a, in_off) for a in (gate, up, dout)), dgate=dgate, dup=dup)
    want_dgate, want_dup = swiglu.swiglu_backward_reference(gate, up, dout)
    assert_close(dgate, want_dgate, dtype, "swiglu_backward dgate")
    assert_close(dup, want_dup, dtype, "swiglu_backward dup")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_swiglu_launchers_allocate_outputs(dtype):
    dtype = KERNEL_DTYPES[dtype]
    gate, up, dout = make_inputs((4, 1000), dtype, 3)
    out = swiglu.swiglu_forward(on_gpu(gate, 0), on_gpu(up, 0))
    assert out.dtype == dtype and out.shape == gate.shape
    assert_close(out, swiglu.swiglu_forward_reference(gate, up), dtype, "swiglu_forward")
    dgate, dup = swiglu.swiglu_backward(on_gpu(gate, 0), on_gpu(up, 0), on_gpu(dout, 0))
    for got, want in zip((dgate, dup), swiglu.swiglu_backward_reference(gate, up, dout)):
        assert_close(got, want, dtype, "swiglu_backward")
    empty = swiglu.swiglu_forward(on_gpu(gate[:0], 0), on_gpu(up[:0], 0))
    assert empty.shape == (0, 1000)


@pytest.mark.parametrize("dtype", op_cases.SWIGLU_REFERENCE_TOL)
def test_references_match_float64_formula(dtype):
    op_cases.run_swiglu_reference_case(dtype, "cuda")    # on NumPy: tests/test_kernels.py


def test_gpu_launchers_check_operands():
    cp = backend.cupy_module()
    a = cp.ones((8, 8), np.float32)
    with pytest.raises(LlamacError, match="C-contiguous"):
        swiglu.swiglu_forward(a.T, a)
    with pytest.raises(LlamacError, match="float32, bfloat16 or float16"):
        swiglu.swiglu_forward(a.astype(np.float64), a.astype(np.float64))
    with pytest.raises(DeviceError, match="one device"):
        swiglu.swiglu_forward(a, np.ones((8, 8), np.float32))
    with pytest.raises(LlamacError, match="overlaps"):
        swiglu.swiglu_forward(a, cp.ones((8, 8), np.float32), out=a)
    with pytest.raises(LlamacError, match="overlaps"):
        d = cp.empty((8, 8), np.float32)
        swiglu.swiglu_backward(a, a, a, dgate=d, dup=d)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_common_cuh_conversions_are_exact(dtype):
    """store_f rounds fp32 exactly as NumPy/ml_dtypes do; load_f widens exactly."""
    cp = backend.cupy_module()
    dtype = KERNEL_DTYPES[dtype]
    source = convert_source()
    narrow = backend.get_kernel_from_source(source, "narrow", dtype)
    widen = backend.get_kernel_from_source(source, "widen", dtype)

    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0,
                        np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, 65504, 65520, 65519.99,
                        1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 6e-8, 3e-8, 2.9e-8], np.float32)
    random_bits = np.random.default_rng(4).integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    wide = np.concatenate([special, random_bits.view(np.float32)])
    out = cp.empty(wide.size, dtype)
    narrow((64,), (256,), (cp.asarray(wide), out, np.int64(wide.size)))
    with np.errstate(all="ignore"):  # random bits overflow fp16 on purpose
        want = wide.astype(dtype)
    got = backend.to_numpy(out)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    bits = np.uint32 if dtype.itemsize == 4 else np.uint16
    mismatch = np.flatnonzero(got[~nan].view(bits) != want[~nan].view(bits))
    assert mismatch.size == 0, f"store_f differs for fp32 inputs {wide[~nan][mismatch[:8]]}"

    if dtype.itemsize == 2:  # every 16-bit pattern
        narrow_bits = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    else:
        narrow_bits = random_bits.view(np.float32)
    back = cp.empty(narrow_bits.size, np.float32)
    widen((64,), (256,), (cp.asarray(narrow_bits), back, np.int64(narrow_bits.size)))
    got, want = backend.to_numpy(back), narrow_bits.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.slow
def test_swiglu_forward_indexes_past_2_to_the_31():
    """64-bit indexing: elements past 2^31 are written and correct (fp16, about 13 GB of GPU memory)."""
    cp = backend.cupy_module()
    n = (1 << 31) + 17
    gate = (cp.arange(n, dtype=np.float32) % 13 - 6).astype(np.float16)
    up = (cp.arange(n, dtype=np.float32) % 7 - 3).astype(np.float16)
    out = cp.full(n, np.nan, np.float16)
    swiglu.swiglu_forward(gate, up, out=out)
    for lo in (0, (1 << 31) - 500, n - 1000):
        sl = slice(lo, lo + 1000)
        assert_close(out[sl], swiglu.swiglu_forward_reference(gate[sl].get(), up[sl].get()), np.float16,
                     f"swiglu_forward [{lo}:{lo + 1000}]")
