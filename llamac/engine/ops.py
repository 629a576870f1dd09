"""Primitive Functions: forward and backward side by side, on xp arrays (NumPy or CuPy).

Every primitive is checked against a float64 finite-difference gradient in tests/test_ops.py.
The functions users call (and the ops composed from these) are in llamac/engine/functional.py."""
from __future__ import annotations

import builtins
import math

import numpy as np

from llamac.engine import backend, cpu
from llamac.engine.tensor import Function, unbroadcast
from llamac.errors import ShapeError


def _broadcast_check(a, b, op):
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


# ---------------------------------------------------------------- elementwise binary

class Add(Function):
    def forward(self, a, b):
        if a.shape != b.shape:
            _broadcast_check(a, b, "add")
        elif a.size >= cpu.MIN_ELEMENTS and a.dtype == b.dtype and isinstance(a, np.ndarray) \
                and a.flags.c_contiguous and b.flags.c_contiguous:    # the residual adds, on every core
            out, a1, b1 = np.empty_like(a), a.reshape(-1), b.reshape(-1)
            o1 = out.reshape(-1)
            cpu.for_row_blocks(lambda i, j: np.add(a1[i:j], b1[i:j], out=o1[i:j]), a.size, a.size)
            return out
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    def forward(self, a, b):
        if a.shape != b.shape:
            _broadcast_check(a, b, "sub")
        return a - b

    def backward(self, g):
        return g, -g


class Mul(Function):
    def forward(self, a, b):
        if a.shape != b.shape:
            _broadcast_check(a, b, "mul")
        self.save(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return g * b, g * a


class Div(Function):
    def forward(self, a, b):
        if a.shape != b.shape:
            _broadcast_check(a, b, "div")
        self.save(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        gb = -g * a / (b * b) if self.needs_grad[1] else None
        return g / b, gb


def _scalar(a, c):
    """c as a's dtype when a is floating (bf16 included, whose NumPy kind is 'V'), so that the result
    keeps a's dtype whatever the array library's promotion rules; else c itself (int arrays promote)."""
    return a.dtype.type(c) if a.dtype.kind == "f" or a.dtype == backend.bfloat16 else c


class AddScalar(Function):
    """a + c for a Python number c: no device array is made for c (a host-to-device copy on the GPU)."""

    def forward(self, a, c):
        return a + _scalar(a, c)

    def backward(self, g):
        return g


class MulScalar(Function):
    def forward(self, a, c):
        self.c = c
        return a * _scalar(a, c)

    def backward(self, g):
        return g * g.dtype.type(self.c)


class Pow(Function):
    """a ** b with both operands tensors (b's gradient needs log a, so a > 0 there)."""

    def forward(self, a, b):
        _broadcast_check(a, b, "pow")
        out = a ** b
        self.save(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        xp = backend.get_array_module(a)
        ga = g * b * a ** (b - 1)
        gb = g * out * xp.log(xp.where(a > 0, a, 1)) if self.needs_grad[1] else None
        return ga, gb


class PowScalar(Function):
    def forward(self, a, exponent):
        self.exponent = exponent
        self.save(a)
        return a ** a.dtype.type(exponent)

    def backward(self, g):
        (a,) = self.saved
        e = a.dtype.type(self.exponent)
        return g * e * a ** (e - 1)


def compute_dtype(dtype):
    """Reductions and softmaxes run in fp32 at least (fp64 stays fp64, for gradient checks)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Exp(Function):
    def forward(self, a):
        out = backend.get_array_module(a).exp(a)
        self.save(out)
        return out

    def backward(self, g):
        return g * self.saved[0]


class Log(Function):
    def forward(self, a):
        self.save(a)
        return backend.get_array_module(a).log(a)

    def backward(self, g):
        return g / self.saved[0]


class Sqrt(Function):
    def forward(self, a):
        out = backend.get_array_module(a).sqrt(a)
        self.save(out)
        return out

    def backward(self, g):
        return g / (2 * self.saved[0])


class Rsqrt(Function):
    def forward(self, a):
        out = 1 / backend.get_array_module(a).sqrt(a)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return g * (-0.5) * out * out * out


class Tanh(Function):
    def forward(self, a):
        out = backend.get_array_module(a).tanh(a)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return g * (1 - out * out)


def sigmoid(xp, x):
    """1 / (1 + exp(-x)) on an xp array. For x << 0, exp overflows to inf and the result is the
    correct 0, so only the overflow warning needs silencing; two passes instead of where()'s four."""
    with np.errstate(over="ignore"):
        z = xp.exp(-x)
    z += 1
    return xp.reciprocal(z, out=z)


class Sigmoid(Function):
    def forward(self, a):
        out = sigmoid(backend.get_array_module(a), a)
        self.save(out)
        return out

    def backward(self, g):
        s = self.saved[0]
        return g * s * (1 - s)


class SiLU(Function):
    def forward(self, a):
        s = sigmoid(backend.get_array_module(a), a)
        self.save(a, s)
        return a * s

    def backward(self, g):
        a, s = self.saved
        return g * s * (1 + a * (1 - s))


class ReLU(Function):
    def forward(self, a):
        self.save(a > 0)
        return a * self.saved[0]

    def backward(self, g):
        return g * self.saved[0]


class GELU(Function):
    """GELU, tanh approximation (GPT-2's), as torch.nn.functional.gelu(approximate='tanh')."""
    C = math.sqrt(2 / math.pi)

    def forward(self, a):
        xp = backend.get_array_module(a)
        t = xp.tanh(self.C * (a + 0.044715 * a * a * a))
        self.save(a, t)
        return 0.5 * a * (1 + t)

    def backward(self, g):
        a, t = self.saved
        dt = (1 - t * t) * self.C * (1 + 3 * 0.044715 * a * a)
        return g * (0.5 * (1 + t) + 0.5 * a * dt)


class Cast(Function):
    def forward(self, a, dtype):
        self.src = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.src)


# ---------------------------------------------------------------- reductions

def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axis)


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.in_shape, self.axes, self.keepdims = a.shape, _axes(axis, a.ndim), keepdims
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        xp = backend.get_array_module(g)
        if not self.keepdims:
            g = g.reshape([1 if i in self.axes else n for i, n in enumerate(self.in_shape)])
        return xp.broadcast_to(g, self.in_shape)


class Max(Function):
    """Max over axes; the gradient is shared equally among tied maxima."""

    def forward(self, a, axis=None, keepdims=False):
        axes = _axes(axis, a.ndim)
        out = a.max(axis=axes, keepdims=True)
        mask = a == out
        self.save(mask, mask.sum(axis=axes, keepdims=True))
        self.axes, self.keepdims = axes, keepdims
        return out if keepdims else out.squeeze(axis=axes)

    def backward(self, g):
        mask, count = self.saved
        if not self.keepdims:
            g = g.reshape(count.shape)
        return mask * (g / count)


class Cumsum(Function):
    """Running sum; accumulated in fp32 for narrow types (CuPy has no bf16 scan)."""

    def forward(self, a, axis):
        self.axis = axis
        xp = backend.get_array_module(a)
        return xp.cumsum(a.astype(compute_dtype(a.dtype), copy=False), axis=axis).astype(a.dtype, copy=False)

    def backward(self, g):
        xp = backend.get_array_module(g)
        acc = g.astype(compute_dtype(g.dtype), copy=False)
        return xp.flip(xp.cumsum(xp.flip(acc, self.axis), axis=self.axis), self.axis).astype(g.dtype, copy=False)


# ---------------------------------------------------------------- shape

class Reshape(Function):
    def forward(self, a, shape):
        self.in_shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ShapeError(f"reshape: cannot reshape {a.shape} ({a.size} elements) to {tuple(shape)}") from None

    def backward(self, g):
        return g.reshape(self.in_shape)


class Permute(Function):
    def forward(self, a, axes):
        if sorted(ax % builtins.max(a.ndim, 1) for ax in axes) != list(range(a.ndim)):
            raise ShapeError(f"permute: axes {tuple(axes)} are not a permutation for shape {a.shape}")
        self.axes = axes
        return a.transpose(axes)

    def backward(self, g):
        return g.transpose(np.argsort(self.axes))


class Expand(Function):
    def forward(self, a, shape):
        self.in_shape = a.shape
        xp = backend.get_array_module(a)
        try:
            return xp.broadcast_to(a, shape)
        except ValueError:
            raise ShapeError(f"expand: cannot expand shape {a.shape} to {tuple(shape)}") from None

    def backward(self, g):
        return unbroadcast(g, self.in_shape)


class Concatenate(Function):
    def forward(self, *arrays, axis=0):
        xp = backend.get_array_module(arrays[0])
        self.axis = axis % arrays[0].ndim
        self.sizes = [a.shape[self.axis] for a in arrays]
        try:
            return xp.concatenate(arrays, axis=self.axis)
        except ValueError:
            raise ShapeError(f"concatenate on axis {axis}: shapes {[a.shape for a in arrays]} do not fit") from None

    def backward(self, g):
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(backend.get_array_module(g).split(g, bounds, axis=self.axis))


class GetItem(Function):
    """Slicing and integer-array indexing (gather); the backward scatter-adds so repeated indices sum."""

    def forward(self, a, index):
        self.in_shape, self.dtype, self.index = a.shape, a.dtype, index
        try:
            return a[index]
        except IndexError as exc:
            raise ShapeError(f"index {index!r} out of range for shape {a.shape}: {exc}") from None

    def backward(self, g):
        xp = backend.get_array_module(g)
        index = self.index if isinstance(self.index, tuple) else (self.index,)
        if any(hasattr(i, "dtype") or isinstance(i, list) for i in index):
            return scatter_add(xp, self.in_shape, self.index, g)
        full = xp.zeros(self.in_shape, dtype=g.dtype)
        full[self.index] = g
        return full


def scatter_add(xp, shape, index, values):
    """zeros(shape)[index] += values with repeated indices summed; narrow dtypes accumulate in fp32
    (more accurate, and CuPy's add.at has no bf16)."""
    acc = compute_dtype(values.dtype)
    full = xp.zeros(shape, dtype=acc)
    if xp is np and getattr(index, "ndim", 0) == 1 and index.dtype.kind in "iu" and len(shape) == 2 \
            and values.shape == (len(index), shape[1]):
        # Embedding rows: NumPy's add.at is ~3x faster on one flat index per element than on rows.
        rows = np.where(index < 0, index + shape[0], index)
        flat = (rows[:, None] * shape[1] + np.arange(shape[1])).reshape(-1)
        np.add.at(full.reshape(-1), flat, values.astype(acc, copy=False).reshape(-1))
        return full.astype(values.dtype, copy=False)
    xp.add.at(full, index, values.astype(acc, copy=False))
    return full.astype(values.dtype, copy=False)


class Where(Function):
    def forward(self, cond, a, b):
        self.save(cond)
        return backend.get_array_module(a).where(cond, a, b)

    def backward(self, g):
        (cond,) = self.saved
        zero = g.dtype.type(0)
        xp = backend.get_array_module(g)
        return None, xp.where(cond, g, zero), xp.where(cond, zero, g)


# ---------------------------------------------------------------- softmax family

class Softmax(Function):
    def forward(self, a, axis=-1):
        xp = backend.get_array_module(a)
        e = xp.exp(a - a.max(axis=axis, keepdims=True))
        out = e / e.sum(axis=axis, keepdims=True)
        self.axis = axis
        self.save(out)
        return out

    def backward(self, g):
        (y,) = self.saved
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, a, axis=-1):
        xp = backend.get_array_module(a)
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.axis = axis
        self.save(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        xp = backend.get_array_module(g)
        return g - xp.exp(out) * g.sum(axis=self.axis, keepdims=True)
