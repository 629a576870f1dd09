"""Finite-difference gradient checks (float64, central differences), Chainer's check_backward."""
from __future__ import annotations

import numpy as np

from llamac.engine.tensor import Tensor


def numerical_grads(f, arrays, projection, eps=1e-6):
    """d sum(f(arrays) * projection) / d arrays[i], by central differences."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            plus = float((f(*arrays) * projection).sum())
            flat[i] = old - eps
            minus = float((f(*arrays) * projection).sum())
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def check_grad(fn, *arrays, rtol=1e-5, atol=1e-7, eps=1e-6, seed=0, differentiable=None):
    """Compare autograd with central differences for `fn(*tensors) -> Tensor` on float64 inputs.

    `differentiable` lists which inputs get gradients (default: the float ones). Raises
    AssertionError naming the input and the worst element on a mismatch.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, copy=True) for a in arrays]
    if differentiable is None:
        differentiable = [a.dtype == np.float64 for a in arrays]
    tensors = [Tensor(a, requires_grad=d) for a, d in zip(arrays, differentiable)]
    out = fn(*tensors)
    projection = rng.standard_normal(out.shape)
    out.backward(projection)
    analytic = [t.grad for t, d in zip(tensors, differentiable) if d]

    def value(*arrs):
        return fn(*[Tensor(a) for a in arrs]).data

    wrt = [i for i, d in enumerate(differentiable) if d]
    numeric_all = numerical_grads(value, arrays, projection, eps)
    for n, i in enumerate(wrt):
        got, want = analytic[n], numeric_all[i]
        if got is None:
            raise AssertionError(f"input {i}: no gradient reached it")
        if got.shape != want.shape:
            raise AssertionError(f"input {i}: gradient shape {got.shape} != input shape {want.shape}")
        err = np.abs(got - want)
        if err.max(initial=0.0) > atol + rtol * np.abs(want).max(initial=0.0):
            j = int(np.argmax(err))
            raise AssertionError(f"input {i}: autograd {got.reshape(-1)[j]:.8g} vs finite difference "
                                 f"{want.reshape(-1)[j]:.8g} at flat index {j} (max abs err {err.max():.3g})")
    return True
