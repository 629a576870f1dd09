"""The fused ops' test tables, Chainer-style: one table per op (a list of cases) and one body that runs a
case on a backend. tests/test_op_table.py runs every case on the CPU; tests/gpu/test_op_table.py runs the
same cases, through the same body, on the GPU (skipped without one).

An OpCase is an op through its autograd Function (the path the model takes), its inputs, and float64
references written out from the definition:

  fn           fn(*tensors, **const) -> Tensor; `const` holds the non-differentiable operands (ids,
               targets, documents, RoPE tables), moved to the backend's device
  inputs       inputs(rng, dtype) -> (float64 arrays, one per differentiable input; const as NumPy arrays)
  forward      forward(*arrays, **const) -> the output in float64, from the inputs as the op sees them
               (rounded to the dtype being tested)
  backward     backward(*arrays, proj, **const) -> the input gradients of sum(output * proj) in float64,
               where the formula is short; otherwise the reference gradients are the op's own float64
               gradients on the CPU, which the float64 run of the case checks against central
               differences (llamac.engine.gradcheck.check_grad)
  dtypes       the dtypes it runs in on the CPU; the GPU runs the ones in GPU_DTYPES (no float64 there:
               the kernels take fp32, bf16 and fp16), or `gpu_dtypes` where the GPU path takes fewer
  tol          relative error by norm, |got - want| / |want|, per dtype: one number for the output and
               every gradient, or a list (output, then each gradient)
  elementwise  per dtype, (rtol, atol) per result (output, then each gradient; None: not checked), on top
               of `tol`: np.testing.assert_allclose

Below the tables: SwiGLU's NumPy/CuPy references against their formula on either backend, and the AdamW
table, the same idea for the optimizer step (three steps on the backend against the update written out in
float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import llamac
from llamac.engine import backend
from llamac.engine.gradcheck import check_grad
from llamac.ops import attention, embedding, linear, lora, rmsnorm, rope, swiglu
from llamac.train.optim import AdamW

BF16 = backend.bfloat16
GPU_DTYPES = ("float32", "bfloat16")
# Outputs and gradients against float64 on the same rounded inputs: fp32 differs by its rounding inside
# the op, bf16 by its narrow storage (the inputs' own rounding is not counted: the reference sees it too).
TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2}


def rel(got, want) -> float:
    """|got - want| / |want| by norm (float64, host)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def max_rel(got, want) -> float:
    """max |got - want| / max |want| (float64, host)."""
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


@dataclass(frozen=True)
class OpCase:
    name: str
    fn: Callable
    inputs: Callable
    forward: Callable
    backward: Callable | None = None
    dtypes: tuple = ("float64", "float32", "bfloat16")
    gpu_dtypes: tuple | None = None          # None: those of `dtypes` in GPU_DTYPES
    tol: dict = field(default_factory=dict)
    elementwise: dict = field(default_factory=dict)

    def __repr__(self):
        return self.name

    def dtypes_on(self, device: str) -> tuple:
        if device == "cpu":
            return self.dtypes
        return tuple(d for d in self.dtypes if d in GPU_DTYPES) if self.gpu_dtypes is None else self.gpu_dtypes


def _per_result(spec, i):
    """A list holds one entry per result (output, then each gradient); anything else holds for all."""
    return spec[i] if isinstance(spec, list) else spec


def run_op_case(case: OpCase, dtype: str, device: str):
    """The one body: case.fn on `device` in `dtype`, output and input gradients against float64."""
    rng = np.random.default_rng(0)
    arrays, const = case.inputs(rng, dtype)
    exact = [np.asarray(a, np.float64).astype(backend.as_dtype(dtype)).astype(np.float64) for a in arrays]
    if dtype == "float64":
        # the op's float64 gradients (the reference for the narrower dtypes) against central differences
        assert check_grad(lambda *ts: case.fn(*ts, **const), *exact)

    host = np.float64 if dtype == "float64" else np.float32          # exact: the values are already rounded
    tensors = [llamac.tensor(a.astype(host), dtype=dtype, device=device, requires_grad=True) for a in exact]
    on_device = {k: backend.to_device(v, device) if isinstance(v, np.ndarray) else v for k, v in const.items()}
    out = case.fn(*tensors, **on_device)
    assert backend.device_of(out.data) == device, f"{case.name}: the output is not on {device}"
    proj = np.asarray(rng.standard_normal(out.shape)).astype(out.dtype).astype(np.float64)
    out.backward(llamac.tensor(proj.astype(host), dtype=out.dtype, device=device))

    want_out = case.forward(*exact, **const)
    if case.backward is not None:
        want_grads = case.backward(*exact, proj, **const)
    elif dtype == "float64":
        want_grads = [None] * len(exact)        # the op's own: checked by check_grad above
    else:
        ts = [llamac.tensor(a, dtype="float64", requires_grad=True) for a in exact]
        case.fn(*ts, **const).backward(proj)
        want_grads = [t.grad for t in ts]

    tol = case.tol.get(dtype, TOL[dtype])
    elementwise = case.elementwise.get(dtype)
    names = ["output"] + [f"grad of input {i}" for i in range(len(exact))]
    for i, (what, t, want) in enumerate(zip(names, [out] + tensors, [want_out] + list(want_grads))):
        got = t.data if i == 0 else t.grad
        assert got is not None, f"{case.name}: no {what}"
        if want is None:
            continue
        got = backend.to_numpy(got).astype(np.float64)
        assert got.shape == np.shape(want), f"{case.name} {what}: shape {got.shape} != {np.shape(want)}"
        err = rel(got, want)
        limit = _per_result(tol, i)
        assert err <= limit, f"{case.name} {what} in {dtype} on {device}: relative error {err:.3g} > {limit}"
        pair = _per_result(elementwise, i) if elementwise is not None else None
        if pair is not None:
            np.testing.assert_allclose(got, want, rtol=pair[0], atol=pair[1], err_msg=f"{case.name} {what}")


def op_params(device: str):
    """(case, dtype) for every case of every table that runs on `device`, with readable ids."""
    return [pytest.param(case, dtype, id=f"{case.name}-{dtype}")
            for case in OP_CASES for dtype in case.dtypes_on(device)]


# ================================================================ float64 references

def normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def rms64(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def sigmoid64(g):
    with np.errstate(over="ignore"):         # exp(1000) = inf: sigmoid(-1000) = 0, as it should be
        return 1 / (1 + np.exp(-g))


def rotate64(x, cos, sin):
    """Pair i of position t is the complex number x[2i] + i x[2i+1], times cos + i sin of its angle."""
    turn = np.asarray(cos, np.float64) + 1j * np.asarray(sin, np.float64)          # (T, hs / 2)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn[None, :, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def naive64(q, k, v, causal, segments):
    """out, lse, and the probabilities, in float64, straight from the definition."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kx = np.repeat(k, G, axis=2)                                        # (B, Tk, H, hs)
    vx = np.repeat(v, G, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kx) / math.sqrt(hs)             # (B, H, Tq, Tk)
    i = np.arange(Tq)[:, None] + Tk - Tq
    j = np.arange(Tk)[None, :]
    visible = np.ones((B, 1, Tq, Tk), bool)
    if causal:
        visible &= (j <= i)[None, None]
    if segments is not None:
        visible &= (segments[:, Tk - Tq:, None] == segments[:, None, :])[:, None]
    s = np.where(visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]                # (B, H, Tq)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", p, vx)
    return out, lse, p, visible


def attention64(q, k, v, causal=True, segments=None):
    """softmax(q k^T / sqrt(hs)) v over the visible keys; queries are the last Tq of the Tk positions."""
    return naive64(q, k, v, causal, segments)[0]


def documents(rng, B, T, cuts=3):
    """(B, T) non-decreasing document ids, a few boundaries a row (packed training data)."""
    seg = np.zeros((B, T), np.int64)
    for b in range(B):
        for c in rng.choice(np.arange(1, T), size=min(cuts, T - 1), replace=False):
            seg[b, c:] += 1
    return seg


def rope_tables(T, hs, dtype):
    ang = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hs, 2) / hs))[None]
    table = np.float64 if dtype == "float64" else np.float32
    return {"cos": np.cos(ang).astype(table), "sin": np.sin(ang).astype(table)}


# ================================================================ the tables

LINEAR = [
    OpCase("linear", lambda x, w: linear.linear(x, w),
           lambda rng, dt: ([normal(rng, 3, 5, 7), normal(rng, 9, 7)], {}),
           lambda x, w: x @ w.T),
    OpCase("linear_bias", lambda x, w, b: linear.linear(x, w, b),
           lambda rng, dt: ([normal(rng, 3, 4), normal(rng, 5, 4), normal(rng, 5)], {}),
           lambda x, w, b: x @ w.T + b),
]

EMBEDDING = [   # repeated ids: their rows of the weight gradient are sums
    OpCase("embedding_repeated_ids", lambda w, ids: embedding.embedding(ids, w),
           lambda rng, dt: ([normal(rng, 6, 7)], {"ids": np.array([0, 2, 2, 4, 1])}),
           lambda w, ids: w[ids]),
    OpCase("embedding_2d_ids", lambda w, ids: embedding.embedding(ids, w),
           lambda rng, dt: ([normal(rng, 5, 4)], {"ids": np.array([[0, 3, 3], [1, 0, 3]])}),
           lambda w, ids: w[ids]),
]


def _add_rms_norm(x, h, w):
    s, n = rmsnorm.add_rms_norm(x, h, w)
    return llamac.stack([s, n])


def _add_rms_norm_chain(x, h1, h2, w):
    """Two residual adds as in the model, the first norm's output also feeding the second sum: the backward
    of the first pair folds in the residual gradient of the second (GPU: kernels/add_rmsnorm.cu's dres)."""
    s1, n1 = rmsnorm.add_rms_norm(x, h1, w)
    s2, n2 = rmsnorm.add_rms_norm(s1, n1 + h2, w)
    return llamac.stack([n2, s2])


def _add_rms_norm_chain64(x, h1, h2, w):
    s1 = x + h1
    s2 = s1 + (rms64(s1, w) + h2)
    return np.stack([rms64(s2, w), s2])


# The fp32 CPU path (rows in threaded blocks from 4000 rows on) against float64, element by element.
RMS_ELEMENTWISE = {"float32": [(1e-5, 1e-5), (1e-4, 1e-4), (1e-4, 1e-3)]}

RMSNORM = [
    OpCase("rms_norm", lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
           lambda rng, dt: ([normal(rng, 3, 5, 8), normal(rng, 8)], {}), rms64),
    OpCase("rms_norm_3_rows", lambda x, w: rmsnorm.rms_norm(x, w),
           lambda rng, dt: ([normal(rng, 3, 64), normal(rng, 64)], {}), rms64, elementwise=RMS_ELEMENTWISE),
    OpCase("rms_norm_4000_rows", lambda x, w: rmsnorm.rms_norm(x, w),
           lambda rng, dt: ([normal(rng, 4000, 64), normal(rng, 64)], {}), rms64,
           dtypes=("float32", "bfloat16"), elementwise=RMS_ELEMENTWISE),
    OpCase("add_rms_norm", _add_rms_norm,
           lambda rng, dt: ([normal(rng, 3, 5, 8), normal(rng, 3, 5, 8), rng.uniform(0.5, 1.5, 8)], {}),
           lambda x, h, w: np.stack([x + h, rms64(x + h, w)])),
    OpCase("add_rms_norm_chain", _add_rms_norm_chain,
           lambda rng, dt: ([normal(rng, 3, 8) for _ in range(3)] + [rng.uniform(0.5, 1.5, 8)], {}),
           _add_rms_norm_chain64),
]

ROPE = [
    OpCase("rope", lambda x, cos, sin: rope.rope(x, cos, sin),
           lambda rng, dt: ([normal(rng, 2, 7, 3, 8)], rope_tables(7, 8, dt)), rotate64),
]


def _swiglu64_grads(g, u, d):
    s = sigmoid64(g)
    silu = g * s
    return [d * u * (s + silu * (1 - s)), d * silu]


# The fp32 CPU path (threaded row blocks at 64 x 3001) against the formula, element by element.
SWIGLU_ELEMENTWISE = {"float32": [(1e-5, 1e-6), (1e-4, 1e-5), (1e-5, 1e-6)]}

SWIGLU = [
    OpCase("swiglu", swiglu.swiglu, lambda rng, dt: ([normal(rng, 3, 7, scale=4), normal(rng, 3, 7)], {}),
           lambda g, u: g * sigmoid64(g) * u, _swiglu64_grads, elementwise=SWIGLU_ELEMENTWISE),
    OpCase("swiglu_64x3001", swiglu.swiglu,
           lambda rng, dt: ([normal(rng, 64, 3001, scale=4), normal(rng, 64, 3001)], {}),
           lambda g, u: g * sigmoid64(g) * u, _swiglu64_grads, dtypes=("float32", "bfloat16"),
           elementwise=SWIGLU_ELEMENTWISE),
    # silu(-1000) = 0 and silu(1000) = 1000, exactly in fp32 (no inf or nan from exp(1000))
    OpCase("swiglu_saturates", swiglu.swiglu, lambda rng, dt: ([np.array([-1000.0, 1000.0]), np.ones(2)], {}),
           lambda g, u: g * sigmoid64(g) * u, _swiglu64_grads, dtypes=("float32", "bfloat16"),
           elementwise={"float32": [(0, 0), None, None]}),
]


def _cross_entropy64(x, targets):
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    valid = targets != -100
    picked = np.take_along_axis(x, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return np.asarray((lse - picked)[valid].mean())


CROSS_ENTROPY = [   # ignored positions (-100) count nowhere: not in the mean, no gradient
    OpCase("cross_entropy_ignore_index", lambda x, targets: llamac.cross_entropy(x, targets),
           lambda rng, dt: ([normal(rng, 2, 3, 5)], {"targets": np.array([[1, 4, -100], [0, -100, 2]])}),
           _cross_entropy64),
    OpCase("cross_entropy_3x4", lambda x, targets: llamac.cross_entropy(x, targets),
           lambda rng, dt: ([normal(rng, 3, 4, 5)],
                            {"targets": np.array([[1, 3, -100, 0], [2, 2, 1, -100], [0, 4, 4, 3]])}),
           _cross_entropy64),
]


def _attention_case(name, B, Tq, Tk, H, Hkv, hs, segments):
    def inputs(rng, dt):
        arrays = [normal(rng, B, Tq, H, hs), normal(rng, B, Tk, Hkv, hs), normal(rng, B, Tk, Hkv, hs)]
        return arrays, ({"segments": segments} if segments is not None else {})
    return OpCase(name, lambda q, k, v, segments=None: attention.attention(q, k, v, segments),
                  inputs, lambda q, k, v, segments=None: attention64(q, k, v, True, segments))


def _flash_case(name, B, T, H, Hkv, hs, dtypes, gpu_dtypes, tol=None):
    def inputs(rng, dt):
        arrays = [normal(rng, B, T, H, hs), normal(rng, B, T, Hkv, hs), normal(rng, B, T, Hkv, hs)]
        return arrays, {"segments": documents(np.random.default_rng(7), B, T)}
    return OpCase(name, lambda q, k, v, segments: attention.flash_attention(q, k, v, True, segments),
                  inputs, lambda q, k, v, segments: attention64(q, k, v, True, segments),
                  dtypes=dtypes, gpu_dtypes=gpu_dtypes, tol=tol or {})


SEGMENTS_5 = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
FLASH_BF16_TOL = [1e-2, 2e-2, 2e-2, 2e-2]     # out, dq, dk, dv

ATTENTION = [
    # grouped-query (H query heads over Hkv key/value heads) with causal documents
    _attention_case("attention_2x2_documents", 2, 5, 5, 2, 2, 4, SEGMENTS_5),
    _attention_case("attention_4x2_documents", 2, 5, 5, 4, 2, 4, SEGMENTS_5),
    _attention_case("attention_4x1_documents", 2, 5, 5, 4, 1, 4, SEGMENTS_5),
    # two queries after a cache of four: the last rows of causal attention over all six positions
    _attention_case("attention_after_a_cache", 1, 2, 6, 2, 2, 4, None),
    # FlashAttention: the references at hs 8 (CPU only: on CuPy the backward takes only the kernels' bf16
    # and fp16 at their head sizes), the kernels on the GPU at 48 and 64 in bf16 (out against float64 to
    # 1e-2, its gradients to 2e-2, as against the T x T bias path)
    _flash_case("flash_attention_documents", 2, 10, 4, 2, 8, ("float64", "float32", "bfloat16"), ()),
    _flash_case("flash_attention_hs48", 2, 77, 4, 2, 48, ("float32", "bfloat16"), ("bfloat16",),
                {"bfloat16": FLASH_BF16_TOL}),
    _flash_case("flash_attention_hs64", 2, 77, 4, 2, 64, ("float32", "bfloat16"), ("bfloat16",),
                {"bfloat16": FLASH_BF16_TOL}),
]


def _lora_linear(rows, scale, p=0.0, seed=None):
    """LoRALinear with adapters (A, B) on the given row blocks, as packed q | k | v has them."""
    def fn(x, w, *adapters):
        return lora.LoRALinear.apply(x, w, *adapters, rows=rows, scale=scale, p=p, seed=seed)
    return fn


def _lora_linear64(rows, scale, p=0.0, seed=None):
    def forward(x, w, *adapters):
        keep = lora._dropout_scale(np, x.shape, np.float64, p, seed) if p else 1.0
        out = x @ w.T
        for (a, b), (start, stop) in zip(zip(adapters[0::2], adapters[1::2]), rows):
            out[..., start:stop] += scale * ((x * keep) @ a.T) @ b.T
        return out
    return forward


def _lora_linear_inputs(rows, rank, C=8, O=12):
    def inputs(rng, dt):
        arrays = [normal(rng, 2, 3, C), normal(rng, O, C, scale=0.3)]
        for start, stop in rows:
            arrays += [normal(rng, rank, C, scale=0.3), normal(rng, stop - start, rank, scale=0.3)]
        return arrays, {}
    return inputs


def _lora_swiglu(present, scale, p=0.0, seeds=(None, None, None)):
    def fn(x, w1, w3, w2, *adapters):
        return lora.LoRASwiGLU.apply(x, w1, w3, w2, *adapters, present=present, scale=scale, p=p, seeds=seeds)
    return fn


def _lora_swiglu64(present, scale, p=0.0, seeds=(None, None, None)):
    def forward(x, w1, w3, w2, *adapters):
        pairs = iter(zip(adapters[0::2], adapters[1::2]))
        ab = [next(pairs) if on else None for on in present]

        def project(v, w, i):
            out = v @ w.T
            if ab[i] is not None:
                keep = lora._dropout_scale(np, v.shape, np.float64, p, seeds[i]) if p else 1.0
                out += scale * ((v * keep) @ ab[i][0].T) @ ab[i][1].T
            return out
        gate, up = project(x, w1, 0), project(x, w3, 1)
        return project(gate * sigmoid64(gate) * up, w2, 2)
    return forward


def _lora_swiglu_inputs(present, rank, C=6, H=10):
    def inputs(rng, dt):
        arrays = [normal(rng, 2, 3, C), normal(rng, H, C, scale=0.5), normal(rng, H, C, scale=0.5),
                  normal(rng, C, H, scale=0.5)]
        for on, (out_f, in_f) in zip(present, ((H, C), (H, C), (C, H))):
            if on:
                arrays += [normal(rng, rank, in_f, scale=0.5), normal(rng, out_f, rank, scale=0.5)]
        return arrays, {}
    return inputs


QKV_BLOCKS = ((0, 6), (9, 12))          # adapters on q and v of a q | k | v of 6 | 3 | 3 rows, none on k
ALL_THREE = (True, True, True)
LORA = [   # every input differentiable: the frozen base's gradient (unused by LoRA runs) is checked too
    OpCase("lora_linear", _lora_linear(((0, 12),), 2.0), _lora_linear_inputs(((0, 12),), 3),
           _lora_linear64(((0, 12),), 2.0)),
    OpCase("lora_linear_row_blocks", _lora_linear(QKV_BLOCKS, 0.5), _lora_linear_inputs(QKV_BLOCKS, 2),
           _lora_linear64(QKV_BLOCKS, 0.5)),
    # dropout draws its mask from a seed, on NumPy here (CuPy's generator draws other masks: CPU only)
    OpCase("lora_linear_dropout", _lora_linear(QKV_BLOCKS, 1.5, 0.3, 7), _lora_linear_inputs(QKV_BLOCKS, 2),
           _lora_linear64(QKV_BLOCKS, 1.5, 0.3, 7), dtypes=("float64", "float32"), gpu_dtypes=()),
    OpCase("lora_swiglu", _lora_swiglu(ALL_THREE, 2.0), _lora_swiglu_inputs(ALL_THREE, 2),
           _lora_swiglu64(ALL_THREE, 2.0)),
    OpCase("lora_swiglu_gate_and_down", _lora_swiglu((True, False, True), 0.5),
           _lora_swiglu_inputs((True, False, True), 3), _lora_swiglu64((True, False, True), 0.5)),
    OpCase("lora_swiglu_no_adapters", _lora_swiglu((False, False, False), 1.0),
           _lora_swiglu_inputs((False, False, False), 1), _lora_swiglu64((False, False, False), 1.0)),
    OpCase("lora_swiglu_dropout", _lora_swiglu(ALL_THREE, 1.0, 0.25, (1, 2, 3)), _lora_swiglu_inputs(ALL_THREE, 2),
           _lora_swiglu64(ALL_THREE, 1.0, 0.25, (1, 2, 3)), dtypes=("float64", "float32"), gpu_dtypes=()),
]

OP_CASES = LINEAR + EMBEDDING + RMSNORM + ROPE + SWIGLU + CROSS_ENTROPY + ATTENTION + LORA


# ================================================================ SwiGLU's NumPy/CuPy references

SWIGLU_REFERENCE_TOL = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3}


def run_swiglu_reference_case(dtype: str, device: str):
    """swiglu_forward_reference / swiglu_backward_reference on `device` (the GPU tests' oracle runs on
    CuPy as on NumPy) against the float64 formula, gate's tails included."""
    dt = backend.as_dtype(dtype)
    rng = np.random.default_rng(1)
    gate, up, dout = (rng.normal(0, 3, (7, 129)) for _ in range(3))
    gate.reshape(-1)[:8] = [-90, 90, -30, 30, 0, -0.0, 1e-3, -1e-3]
    gate, up, dout = (a.astype(dt) for a in (gate, up, dout))
    g, u, d = (a.astype(np.float64) for a in (gate, up, dout))
    s = 1 / (1 + np.exp(-g))

    on = [backend.to_device(a, device) for a in (gate, up, dout)]
    out = swiglu.swiglu_forward_reference(on[0], on[1])
    dgate, dup = swiglu.swiglu_backward_reference(*on)
    tol = SWIGLU_REFERENCE_TOL[dtype]
    for got, want, what in ((out, g * s * u, "out"), (dgate, d * u * (s + g * s * (1 - s)), "dgate"),
                            (dup, d * g * s, "dup")):
        assert backend.device_of(got) == device and got.dtype == dt and got.shape == gate.shape, what
        assert max_rel(got, want) <= tol, f"{what}: {max_rel(got, want):.3g} > {tol}"


# ================================================================ AdamW

ADAMW_SHAPES = {"tok_embeddings.weight": (37, 24), "layers.0.attention.wq.weight": (24, 24),
                "layers.0.attention_norm.weight": (24,), "layers.0.feed_forward.w1.weight": (70001,),
                "layers.0.feed_forward.w2.weight": (3, 16385), "layers.0.feed_forward.w3.weight": (200, 170),
                "output.weight": (300, 200), "unused.weight": (5, 5), "norm.weight": (1,)}
ADAMW_CASES = [(dtype, clip) for dtype in ("float32", "bfloat16") for clip in (None, 0.5, 1.0, 1e9)]


def adamw_params():
    return [pytest.param(dtype, clip, id=f"{dtype}-clip{clip}") for dtype, clip in ADAMW_CASES]


def run_adamw_case(dtype: str, clip, device: str):
    """Three AdamW steps (lr changing, fresh gradients each step) on `device` against the update written out
    in float64: decoupled weight decay on matrices other than the embedding, global-norm clipping, bias
    corrections; bf16 parameters keep fp32 masters. A parameter without a gradient stays as it was."""
    lr0, (b1, b2), eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    rng = np.random.default_rng(16)
    params = [(n, llamac.tensor(rng.normal(0, 0.5, s).astype(np.float32), dtype=dtype, device=device,
                                requires_grad=True)) for n, s in ADAMW_SHAPES.items()]
    opt = AdamW(params, lr=lr0, betas=(b1, b2), eps=eps, weight_decay=wd)
    start = {n: p.numpy().copy() for n, p in params}
    ref = {n: a.astype(np.float64) for n, a in start.items()}
    m = {n: np.zeros(s) for n, s in ADAMW_SHAPES.items()}
    v = {n: np.zeros(s) for n, s in ADAMW_SHAPES.items()}
    for t in range(1, 4):
        lr = lr0 * t
        grads = {}
        for n, p in params:
            if n != "unused.weight":
                p.grad = backend.to_device(rng.normal(0, 2.0, p.shape).astype(np.float32).astype(p.dtype), device)
                grads[n] = backend.to_numpy(p.grad).astype(np.float64)
        norm = opt.step(lr=lr, clip=clip)
        want_norm = math.sqrt(sum((g * g).sum() for g in grads.values()))
        assert backend.device_of(norm) == device and np.shape(norm) == ()
        assert abs(float(norm) - want_norm) <= 1e-5 * want_norm, (float(norm), want_norm)
        scale = min(1.0, clip / (want_norm + 1e-6)) if clip else 1.0
        for n, g in grads.items():
            g = g * scale
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            if len(ADAMW_SHAPES[n]) >= 2 and not n.startswith("tok_embeddings"):
                ref[n] *= 1 - lr * wd
            ref[n] -= lr / (1 - b1 ** t) * m[n] / (np.sqrt(v[n] / (1 - b2 ** t)) + eps)
    for n, p in params:
        if n == "unused.weight":
            assert np.array_equal(p.numpy(), start[n]), "a parameter without a gradient changed"
            continue
        master = backend.to_numpy(opt.master[n] if backend.is_low_precision(p.dtype) else p.data)
        assert master.dtype == np.float32
        assert max_rel(master, ref[n]) <= 1e-5, f"{n}: {max_rel(master, ref[n]):.3g}"
        np.testing.assert_allclose(master, ref[n], rtol=1e-5, atol=1e-6, err_msg=n)
        if backend.is_low_precision(p.dtype):
            # the bf16 parameter is its master rounded: within one unit of the last place
            assert max_rel(p.data, ref[n]) <= 1e-2, n
        assert max_rel(opt.m[n], m[n]) <= 1e-5, f"{n} m"
        assert max_rel(opt.v[n], v[n]) <= 1e-5, f"{n} v"
