"""The user-facing ops: functions over Tensors built on the primitives in llamac/engine/ops.py.

Composite ops (mean, var, stack, split, masked_fill, dropout) need no backward of their own:
autograd differentiates the primitives they are made of. Tensor methods are these functions
(x.sum(...) is llamac.engine.functional.sum(x, ...)).
"""
from __future__ import annotations

import builtins

import numpy as np

from llamac.engine.ops import (
    GELU,
    Concatenate,
    Cumsum,
    Exp,
    Expand,
    Log,
    LogSoftmax,
    Max,
    Permute,
    ReLU,
    Reshape,
    Rsqrt,
    Sigmoid,
    SiLU,
    Softmax,
    Sqrt,
    Sum,
    Tanh,
    Where,
    _axes,
    _broadcast_check,
)
from llamac.engine.tensor import Function, Tensor, enable_grad, generator, grad_enabled, no_grad
from llamac.errors import ShapeError
from llamac.ops.cross_entropy import CrossEntropy


def _t(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def exp(x): return Exp.apply(_t(x))
def log(x): return Log.apply(_t(x))
def sqrt(x): return Sqrt.apply(_t(x))
def rsqrt(x): return Rsqrt.apply(_t(x))
def tanh(x): return Tanh.apply(_t(x))
def sigmoid(x): return Sigmoid.apply(_t(x))
def silu(x): return SiLU.apply(_t(x))
def relu(x): return ReLU.apply(_t(x))
def gelu(x): return GELU.apply(_t(x))


def sum(x, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy
    return Sum.apply(_t(x), axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    x = _t(x)
    n = int(np.prod([x.shape[a] for a in _axes(axis, x.ndim)]))
    return Sum.apply(x, axis=axis, keepdims=keepdims) * (1.0 / n)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(_t(x), axis=axis, keepdims=keepdims)


def var(x, axis=None, keepdims=False, correction=0):
    x = _t(x)
    n = int(np.prod([x.shape[a] for a in _axes(axis, x.ndim)]))
    centred = x - mean(x, axis=axis, keepdims=True)
    return sum(centred * centred, axis=axis, keepdims=keepdims) * (1.0 / (n - correction))


def cumsum(x, axis=0):
    return Cumsum.apply(_t(x), axis=axis)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(_t(x), shape=shape)


def permute(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Permute.apply(_t(x), axes=tuple(axes))


def transpose(x, dim0=-2, dim1=-1):
    axes = list(range(x.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return Permute.apply(_t(x), axes=tuple(axes))


def expand(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    shape = tuple(x.shape[i - (len(shape) - x.ndim)] if s == -1 else s for i, s in enumerate(shape))
    return Expand.apply(_t(x), shape=shape)


def concatenate(tensors, axis=0):
    return Concatenate.apply(*[_t(t) for t in tensors], axis=axis)


cat = concatenate


def stack(tensors, axis=0):
    tensors = [_t(t) for t in tensors]
    ax = axis % (tensors[0].ndim + 1)
    return concatenate([reshape(t, t.shape[:ax] + (1,) + t.shape[ax:]) for t in tensors], axis=ax)


def split(x, size_or_sections, axis=-1):
    """Split into pieces of `size` along axis (an int), or at the given section sizes (a list)."""
    n = x.shape[axis]
    sizes = [size_or_sections] * (n // size_or_sections) if isinstance(size_or_sections, int) else list(size_or_sections)
    if isinstance(size_or_sections, int) and n % size_or_sections:
        sizes.append(n % size_or_sections)
    if builtins.sum(sizes) != n:
        raise ShapeError(f"split: sections {sizes} do not add up to {n} (axis {axis} of shape {x.shape})")
    ax = axis % x.ndim
    out, start = [], 0
    for s in sizes:
        index = (slice(None),) * ax + (slice(start, start + s),)
        out.append(x[index])
        start += s
    return out


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else cond
    like = a if isinstance(a, Tensor) else b
    a = like._lift(a) if not isinstance(a, Tensor) else a
    b = like._lift(b) if not isinstance(b, Tensor) else b
    _broadcast_check(a.data, b.data, "where")
    return Where.apply(Tensor(cond), a, b)


def masked_fill(x, mask, value):
    return where(mask, value, x)


def softmax(x, axis=-1):
    return Softmax.apply(_t(x), axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(_t(x), axis=axis)


def cross_entropy(logits, targets, ignore_index=-100):
    targets = targets if isinstance(targets, Tensor) else Tensor(targets)
    return CrossEntropy.apply(_t(logits), targets, ignore_index=ignore_index)


def dropout(x, p=0.1, training=True):
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0.0
    keep = generator(x.device).random(x.shape, dtype=np.float32) >= p
    return x * Tensor((keep / (1 - p)).astype(x.dtype))


class _Recompute(Function):
    """fn(x) computed without recording anything; the backward runs fn again with the graph on and
    backpropagates through that. Only x is kept between forward and backward (activation
    recomputation, as torch.utils.checkpoint). fn's parameters are inputs too, so the output needs
    a gradient whenever they do; their gradients accumulate into their .grad during the inner
    backward, so this node returns None for them."""

    def forward(self, x, *params, fn):
        self.fn = fn
        with no_grad():
            out = fn(Tensor(x))
        self.save(x)
        return out.data

    def backward(self, g):
        (x,) = self.saved
        self.saved = ()
        xt = Tensor(x, requires_grad=self.needs_grad[0])
        with enable_grad():
            out = self.fn(xt)
        out.backward(g)
        return (xt.grad,) + (None,) * (len(self.needs_grad) - 1)


def recompute(fn, x: Tensor, params) -> Tensor:
    """fn(x), keeping only x for the backward, which recomputes fn's activations. fn must be
    deterministic (no dropout) and read no tensor needing a gradient other than x and `params`."""
    params = list(params)
    if not grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return fn(x)
    return _Recompute.apply(x, *params, fn=fn)


def _attach_methods():
    """Tensor methods are the functional ops above (x.sum(...) == llamac.ops.sum(x, ...))."""
    for name in ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "gelu", "sum", "mean", "max",
                 "var", "cumsum", "reshape", "permute", "transpose", "expand", "split", "softmax", "log_softmax",
                 "masked_fill"):
        setattr(Tensor, name, globals()[name])
    Tensor.view = reshape
    Tensor.T = property(lambda self: permute(self, *reversed(range(self.ndim))))


_attach_methods()
