"""CPU bf16 matrix products (llamac.engine.onednn): every product the training step runs against a
float64 product of the same operands rounded to bf16, the attention built on them, the choice of
train.dtype, the fallback without oneDNN, and training in bf16 (deterministic, close to fp32).

The tolerance (TOL_ACCUMULATION): with the operands rounded to bf16 the products are exact in fp32,
so what is left is fp32 accumulation, bounded by K * 2^-23 * (|a| @ |b|) element by element (the
standard bound for a sum of K terms), doubled for the order oneDNN sums in."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llamac import runtime
from llamac.engine import onednn
from llamac.engine.matmul import matmul
from llamac.ops import attention as attn
from llamac.train.precision import resolve_dtype
from tests.test_train import ROOT, debug_recipe

TOL_ACCUMULATION = 2 * 2.0 ** -23

needs_bf16 = pytest.mark.skipif(not onednn.available(), reason=f"no CPU bf16 products here: {onednn.unavailable()}")


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _check_product(got, a, b, prior=None, beta=0.0):
    """got against a @ b (+ beta prior) with a and b rounded to bf16, within the accumulation bound;
    and farther from the fp32 operands' product than that bound (the products really are bf16)."""
    want = np.matmul(_bf16(a), _bf16(b))
    bound = TOL_ACCUMULATION * a.shape[-1] * np.matmul(np.abs(_bf16(a)), np.abs(_bf16(b))) + 1e-30
    if prior is not None:
        want = want + beta * prior.astype(np.float64)
        bound = bound + TOL_ACCUMULATION * np.abs(prior)
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))
    exact = np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert np.max(np.abs(got - exact) - bound) > 0


def _rng():
    return np.random.default_rng(7)


# ---------------------------------------------------------------- the products

PRODUCTS = {
    # name: (a, b) as the training step forms them, from the generator
    "projection x @ w.T": lambda r: (r.standard_normal((4, 32, 96), np.float32), r.standard_normal((80, 96), np.float32).T),
    "input gradient g @ w": lambda r: (r.standard_normal((4, 32, 80), np.float32), r.standard_normal((80, 96), np.float32)),
    "weight gradient g.T @ x": lambda r: (r.standard_normal((128, 80), np.float32).T, r.standard_normal((128, 96), np.float32)),
    "LM head, K above 1024": lambda r: (r.standard_normal((64, 1100), np.float32), r.standard_normal((1100, 48), np.float32)),
    "heads, broadcast keys": lambda r: (r.standard_normal((2, 3, 1, 40, 16), np.float32),
                                        r.standard_normal((2, 3, 2, 16, 24), np.float32)),
    "heads, strided views": lambda r: (r.standard_normal((2, 40, 3, 16), np.float32).transpose(0, 2, 1, 3),
                                       r.standard_normal((2, 24, 3, 16), np.float32).transpose(0, 2, 3, 1)),
}


@needs_bf16
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_each_product_matches_the_bf16_rounded_reference(name):
    a, b = PRODUCTS[name](_rng())
    with runtime.override(cpu_bf16_products=True):
        got = matmul(a, b)
    assert got.dtype == np.float32
    _check_product(got, a, b)


@needs_bf16
def test_a_gradient_accumulates_inside_the_product():
    r = _rng()
    g, x = r.standard_normal((256, 48), np.float32), r.standard_normal((256, 40), np.float32)
    grad = r.standard_normal((48, 40), np.float32)
    prior = grad.copy()
    with runtime.override(cpu_bf16_products=True):
        out = matmul(g.T, x, out=grad, beta=1.0)
    assert out is grad
    _check_product(grad, g.T, x, prior, beta=1.0)


@needs_bf16
def test_an_out_view_in_a_layout_the_kernels_cannot_write_gets_the_result():
    r = _rng()
    a, b = r.standard_normal((2, 3, 20, 16), np.float32), r.standard_normal((2, 3, 16, 12), np.float32)
    target = np.zeros((2, 20, 3, 12), np.float32)
    out = target.transpose(0, 2, 1, 3)                              # heads inside the rows
    onednn.matmul(a, b, out)
    _check_product(target.transpose(0, 2, 1, 3), a, b)


@needs_bf16
def test_the_products_run_on_native_bf16_kernels():
    """Every product above on oneDNN's kernels for a native bf16 multiply (the names ONEDNN_VERBOSE
    prints), not its fp32 kernel or a bf16 emulation."""
    r = _rng()
    with runtime.override(cpu_bf16_products=True):
        for make in PRODUCTS.values():
            matmul(*make(r))
    used = onednn.implementations()
    assert used and all("avx512_core_bf16" in name or "avx512_core_amx" in name for name in used), used


@needs_bf16
def test_where_onednn_has_no_native_bf16_kernel_the_cpu_uses_fp32_and_says_why():
    """oneDNN held to AVX512 without its bf16 instructions (as on a processor without them) would
    emulate bf16 or compute in fp32: llamac asks which kernel it picks, says so and stays fp32."""
    code = ("from llamac.engine import onednn; from llamac.train.precision import resolve_dtype; "
            "print(onednn.bf16_products()); print(*resolve_dtype('bf16', 'cpu'), sep='\\n')")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    on, dtype, why = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout.splitlines()
    assert on == "False" and dtype == "fp32"
    assert why == "no bf16 products on this CPU: oneDNN has no bf16 matmul here" or (
        why.startswith("no bf16 products on this CPU: oneDNN's bf16 matmul here is ")
        and why.endswith(", not a native bf16 kernel")), why


def test_products_outside_fp32_keep_their_path():
    """float64 (the gradient checks) and integers never go to bf16: bit-identical with the option on."""
    r = _rng()
    a, b = r.standard_normal((64, 48)), r.standard_normal((48, 32))
    ia, ib = r.integers(-5, 5, (8, 6)), r.integers(-5, 5, (6, 4))
    want, iwant = matmul(a, b), matmul(ia, ib)
    with runtime.override(cpu_bf16_products=True):
        assert np.array_equal(matmul(a, b), want) and matmul(a, b).dtype == np.float64
        assert np.array_equal(matmul(ia, ib), iwant)


def test_with_the_option_off_fp32_products_are_numpys():
    r = _rng()
    a, w = r.standard_normal((4, 32, 96), np.float32), r.standard_normal((80, 96), np.float32)
    assert np.array_equal(matmul(a, w.T), np.matmul(a.reshape(-1, 96), w.T).reshape(4, 32, 80))


# ---------------------------------------------------------------- attention

@needs_bf16
def test_attention_in_bf16_against_float64():
    """Forward and backward of the CPU attention with bf16 products: relative error by norm within
    2e-2 of the float64 attention (each product's operands round by 2^-9), and not fp32's result."""
    r = _rng()
    B, T, H, Hkv, hs = 3, 24, 4, 2, 16
    q, k, v = (r.standard_normal((B, T, n, hs), np.float32) for n in (H, Hkv, Hkv))
    g = r.standard_normal((B, T, H, hs), np.float32)
    bias = attn.attention_bias(np, T, T)

    def run(dtype):
        out, state = attn.attention_forward(*(x.astype(dtype) for x in (q, k, v)), bias)
        return (out, *attn.attention_backward(g.astype(dtype), *state))

    want, fp32 = run(np.float64), run(np.float32)
    with runtime.override(cpu_bf16_products=True):
        got = run(np.float32)
    for name, x, w, f in zip(("out", "dq", "dk", "dv"), got, want, fp32):
        err = np.linalg.norm(x - w) / np.linalg.norm(w)
        assert x.dtype == np.float32 and err < 2e-2, (name, err)
        assert not np.array_equal(x, f), name


# ---------------------------------------------------------------- train.dtype

def test_dtype_choice():
    assert resolve_dtype("fp32", "cpu")[0] == "fp32"
    assert resolve_dtype("bf16", "cuda")[0] == resolve_dtype("auto", "cuda")[0] == "bf16"
    expected = "bf16" if onednn.available() else "fp32"
    assert resolve_dtype("auto", "cpu")[0] == resolve_dtype("bf16", "cpu")[0] == expected


def test_without_onednn_the_cpu_trains_in_fp32_and_says_why(tmp_path, shard_dir, monkeypatch, capsys):
    from llamac.train.loop import pretrain
    monkeypatch.setattr(onednn, "_state", "oneDNN is not installed (pip install 'llamac[cpu-bf16]')")
    assert resolve_dtype("bf16", "cpu") == ("fp32", "no bf16 products on this CPU: oneDNN is not installed "
                                                     "(pip install 'llamac[cpu-bf16]')")
    losses = {}
    for dtype in ("bf16", "fp32"):
        recipe = debug_recipe(tmp_path / dtype, shard_dir, *_SHORT, f"train.dtype={dtype}")
        capsys.readouterr()
        pretrain(recipe, resume=False)
        notices = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train.dtype")]
        assert notices == ([] if dtype == "fp32" else
                           ["train.dtype bf16: fp32 (no bf16 products on this CPU: oneDNN is not installed "
                            "(pip install 'llamac[cpu-bf16]'))"])
        losses[dtype] = _losses(recipe)
    assert losses["bf16"] == losses["fp32"]


@pytest.mark.parametrize("library", ["missing", "corrupt"])
def test_a_library_that_does_not_load_is_a_reason_not_an_error(tmp_path, library):
    path = tmp_path / "libdnnl.so.3"
    if library == "corrupt":
        path.write_bytes(b"not a shared object")
    code = "from llamac.engine import onednn; print(onednn.unavailable()); print(onednn.bf16_products())"
    env = {"PYTHONPATH": str(ROOT), "LLAMAC_ONEDNN": str(path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    reason, on = out.splitlines()
    expected = ("oneDNN is not installed (pip install 'llamac[cpu-bf16]')" if library == "missing"
                else f"oneDNN at {path} did not load: {path}: ")
    assert on == "False"
    assert reason.startswith(expected) or reason == "this CPU has no native bf16 multiply (avx512_bf16 or amx_bf16)"


# ---------------------------------------------------------------- training

_SHORT = ("train.max_steps=6", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
          "train.sample_tokens=0")


def _losses(recipe) -> list:
    lines = (Path(recipe.out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if '"loss"' in ln]


@needs_bf16
def test_bf16_training_is_deterministic_and_close_to_fp32(tmp_path, shard_dir, capsys):
    from llamac.train.loop import pretrain
    runs = {}
    for name, dtype in (("a", "auto"), ("b", "bf16"), ("fp32", "fp32")):
        recipe = debug_recipe(tmp_path / name, shard_dir, *_SHORT, f"train.dtype={dtype}")
        summary = pretrain(recipe, resume=False)
        runs[name] = (_losses(recipe), summary["val_loss"])
    assert "train.dtype auto: bf16 (matrix products in bf16 through oneDNN" in capsys.readouterr().err
    assert runs["a"] == runs["b"]                                   # auto is bf16 here, and bf16 repeats exactly
    bf16, fp32 = np.array(runs["a"][0]), np.array(runs["fp32"][0])
    assert len(bf16) == 6 and not np.array_equal(bf16, fp32)
    assert np.max(np.abs(bf16 - fp32) / fp32) < 1e-2
    assert abs(runs["a"][1] - runs["fp32"][1]) / runs["fp32"][1] < 1e-2


def test_dtype_is_checked_with_the_recipe():
    from llamac.config import load_recipe
    from llamac.errors import LlamacError
    assert load_recipe(ROOT / "recipes" / "pretrain" / "tiny.yaml").train.dtype == "auto"
    with pytest.raises(LlamacError, match=r"^train.dtype must be fp32, bf16 or auto, got 'fp16'$"):
        load_recipe(ROOT / "recipes" / "pretrain" / "debug.yaml", ["train.dtype=fp16"])


@needs_bf16
def test_the_bench_rows_for_bf16_on_the_cpu():
    from llamac.bench.cpu_products import bench_cpu_products
    from llamac.bench.run import bench_train
    shape = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, seq_len=32, batch_size=2)
    rows = bench_train("cpu", shape, steps=1, compare_torch=True, dtype="bf16")
    assert [r["impl"].split(" (")[0] for r in rows] == ["llamac", "torch " + rows[1]["impl"].split()[1] +
                                                        " eager bf16 autocast", rows[2]["impl"].split(" (")[0]]
    assert rows[2]["impl"].split(" (")[0].endswith("eager fp32")
    assert all(np.isfinite(rows[0][k]) for k in ("vs_torch", "vs_torch_fp32", "step_ms"))
    products = bench_cpu_products(compare_torch=False, reps=1, shapes=((64, 32, 48),))
    assert [r["impl"] for r in products] == ["llamac bf16 (oneDNN)", "oneDNN primitive bf16", "NumPy fp32"]
    assert np.isfinite(products[0]["of_onednn"]) and all(np.isfinite(r["tflops"]) for r in products)
