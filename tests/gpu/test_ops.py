"""Every primitive op on the GPU against its NumPy result: fp32 to 1e-5, bf16 to 1e-2 (relative, by norm).

Forward outputs and the gradients of every float input are compared. The fused ops (linear, embedding,
RMSNorm, RoPE, SwiGLU, cross-entropy, attention) run on both backends from the tables of
tests/op_cases.py (here: tests/gpu/test_op_table.py).
"""
import zlib

import numpy as np
import pytest

import llamac
from llamac.engine import backend, functional

rng = np.random.default_rng(0)
CAT_W, STACK_W = rng.standard_normal((5, 9)), rng.standard_normal((5, 2, 7))
IDX = np.array([0, 2, 2, 4, 1])
COND = rng.random((5, 7)) > 0.5

# name -> (function of tensors, input shapes, positive inputs?)
CASES = {
    "add": (lambda a, b: a + b, [(5, 7), (7,)], False),
    "sub": (lambda a, b: a - b, [(5, 7), (5, 1)], False),
    "mul": (lambda a, b: a * b, [(3, 5, 7), (5, 7)], False),
    "div": (lambda a, b: a / b, [(5, 7), (5, 7)], True),
    "pow": (lambda a, b: a ** b, [(5, 7), (7,)], True),
    "pow_scalar": (lambda a: a ** 3, [(5, 7)], False),
    "matmul": (lambda a, b: a @ b, [(5, 7), (7, 9)], False),
    "matmul_batched": (lambda a, b: a @ b, [(3, 5, 7), (3, 7, 9)], False),
    "neg": (lambda a: -a, [(5, 7)], False),
    "exp": (functional.exp, [(5, 7)], False),
    "log": (functional.log, [(5, 7)], True),
    "sqrt": (functional.sqrt, [(5, 7)], True),
    "rsqrt": (functional.rsqrt, [(5, 7)], True),
    "tanh": (functional.tanh, [(5, 7)], False),
    "sigmoid": (functional.sigmoid, [(5, 7)], False),
    "silu": (functional.silu, [(5, 7)], False),
    "relu": (functional.relu, [(5, 7)], False),
    "gelu": (functional.gelu, [(5, 7)], False),
    "sum": (lambda a: a.sum(axis=1), [(5, 7, 3)], False),
    "mean": (lambda a: a.mean(axis=(0, 2), keepdims=True), [(5, 7, 3)], False),
    "max": (lambda a: a.max(axis=-1), [(5, 7)], False),
    "var": (lambda a: a.var(axis=-1), [(5, 7)], False),
    "cumsum": (lambda a: functional.cumsum(a, axis=1), [(5, 7)], False),
    "reshape": (lambda a: a.reshape(7, 5), [(5, 7)], False),
    "permute": (lambda a: a.permute(2, 0, 1), [(5, 7, 3)], False),
    "expand": (lambda a: a.expand(4, 5, 7), [(5, 1)], False),
    "concatenate": (lambda a, b: llamac.cat([a, b], axis=1), [(5, 4), (5, 5)], False),
    "stack": (lambda a, b: llamac.stack([a, b], axis=1), [(5, 7), (5, 7)], False),
    "split": (lambda a: llamac.split(a, [3, 4], axis=1)[1], [(5, 7)], False),
    "slice": (lambda a: a[1:4, ::2], [(5, 7)], False),
    "gather": (lambda a: a[llamac.tensor(IDX, device="cuda")], [(5, 7)], False),
    "where": (lambda a, b: llamac.where(llamac.tensor(COND, device="cuda"), a, b), [(5, 7), (7,)], False),
    "softmax": (lambda a: llamac.softmax(a, axis=-1), [(5, 7)], False),
    "log_softmax": (lambda a: llamac.log_softmax(a, axis=0), [(5, 7)], False),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _run(fn, arrays, device, dtype):
    """Forward and input gradients, on `device`; the CPU pass swaps cuda-made constants for numpy ones."""
    inputs = [llamac.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in arrays]
    out = fn(*inputs)
    proj = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    out.backward(llamac.tensor(proj, dtype=out.dtype, device=device))
    return out.numpy(), [t.grad if t.grad is None else backend.to_numpy(t.grad) for t in inputs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_on_gpu_matches_numpy(name, dtype, monkeypatch):
    fn, shapes, positive = CASES[name]
    # inputs of the op's own (not the next draws of a generator shared in collection order, which moved
    # whenever a case was added or removed, and differed under -k)
    draw = np.random.default_rng(zlib.crc32(name.encode()))
    arrays = [draw.standard_normal(s).astype(np.float32) for s in shapes]
    if positive:
        arrays = [np.abs(a) + 0.5 for a in arrays]
    # Reference: the same (rounded) inputs in float32 on the CPU.
    rounded = [a.astype(backend.as_dtype(dtype)).astype(np.float32) for a in arrays]
    gpu_out, gpu_grads = _run(fn, rounded, "cuda", dtype)
    real_tensor = llamac.tensor
    monkeypatch.setattr(llamac, "tensor", lambda d, *a, device=None, **k: real_tensor(d, *a, device="cpu", **k))
    cpu_out, cpu_grads = _run(fn, rounded, "cpu", "float32")
    tol = TOLERANCE[dtype]
    assert _rel(gpu_out, cpu_out) <= tol, f"{name} forward"
    for i, (g, c) in enumerate(zip(gpu_grads, cpu_grads)):
        assert g is not None and c is not None
        assert _rel(g, c) <= tol, f"{name} grad of input {i}: {_rel(g, c):.3g}"


@pytest.mark.parametrize("op", ["mul", "rmul", "add", "sub", "rsub", "div"])
def test_scalar_ops_keep_bf16_on_the_gpu(op):
    x = llamac.tensor(np.array([1.0, 2.0, 3.0], np.float32), device="cuda").to("bfloat16")
    out = {"mul": lambda: x * 0.5, "rmul": lambda: 0.5 * x, "add": lambda: x + 0.5, "sub": lambda: x - 0.5,
           "rsub": lambda: 0.5 - x, "div": lambda: x / 2.0}[op]()
    assert out.dtype == backend.bfloat16
    want = {"mul": [0.5, 1, 1.5], "rmul": [0.5, 1, 1.5], "add": [1.5, 2.5, 3.5], "sub": [0.5, 1.5, 2.5],
            "rsub": [-0.5, -1.5, -2.5], "div": [0.5, 1, 1.5]}[op]
    assert np.array_equal(out.numpy().astype(np.float32), np.array(want, np.float32))
