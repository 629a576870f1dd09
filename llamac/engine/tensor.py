"""Tensor and reverse-mode autograd.

A Tensor wraps one xp array (NumPy or CuPy). Every differentiable operation is a
`Function` (llamac/engine/ops.py, llamac/ops/) with `forward` and `backward` side by
side; `Function.apply` runs the forward and, when gradients are wanted, records
the node. `Tensor.backward` walks the recorded graph in reverse topological order
and frees each node's saved arrays once its gradient has been passed on.

The graph holds what each Function saved and, for its inputs, the parameters and
leaves themselves but only a `_Node` (producer, shape) of an intermediate tensor:
an activation that no backward reads (a residual branch's output, say) is freed
as soon as the model's code drops it, not kept until the backward.

Gradients (`.grad`) are plain xp arrays, as in Chainer.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from llamac.engine import backend
from llamac.errors import DeviceError, LlamacError

_state = threading.local()


def grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


class _GradMode(contextlib.ContextDecorator):
    enabled = True

    def __enter__(self):
        self._previous = grad_enabled()
        _state.grad_enabled = self.enabled

    def __exit__(self, *exc):
        _state.grad_enabled = self._previous
        return False


class no_grad(_GradMode):
    """Record nothing inside: no graph, no saved arrays (inference, optimizer steps)."""
    enabled = False


class enable_grad(_GradMode):
    """Record the graph inside even where an outer no_grad is on (recomputation in a backward)."""
    enabled = True


_LOW_PRECISION = (backend.bfloat16, np.dtype(np.float16))


class Function:
    """One primitive. Subclasses define forward(*arrays, **kw) -> array and
    backward(grad_out) -> one gradient (or None) per input, in input order."""

    __slots__ = ("inputs", "needs_grad", "saved", "__dict__")
    unit_grad = False       # set on the root by Tensor.backward: its gradient is exactly 1

    def save(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs) -> "Tensor":
        fn = cls()
        arrays = [t.data for t in inputs]
        xp = _check_same_device(inputs, cls.__name__)
        # On the CPU, bf16/fp16 are a storage format: compute in fp32, store narrow.
        low = None
        if xp is np:
            for i, a in enumerate(arrays):
                if a.dtype in _LOW_PRECISION:
                    low = a.dtype
                    arrays[i] = a.astype(np.float32)
        out = fn.forward(*arrays, **kwargs)
        if low is not None and out.dtype == np.float32:
            out = out.astype(low)
        needs = grad_enabled() and any(t.requires_grad for t in inputs)
        result = Tensor(out, requires_grad=needs)
        if needs:
            fn.inputs = graph_inputs(inputs)
            fn.needs_grad = tuple(t.requires_grad for t in inputs)
            result._ctx = fn
        return result


class _Node:
    """An intermediate tensor's place in the graph: the Function that made it and its shape,
    without its array (Function.inputs holds these; the tensor itself owns its _Node)."""
    __slots__ = ("_ctx", "shape")
    requires_grad = True

    def __init__(self, ctx, shape):
        self._ctx, self.shape = ctx, shape


def graph_inputs(inputs) -> tuple:
    """What a Function's node keeps of its inputs: leaves as they are (their .grad is set), and the
    _Node of each intermediate tensor (its array is freed when nothing else holds it)."""
    return tuple(t._node if t._node is not None and t._node._ctx is not None else t for t in inputs)


def _check_same_device(inputs, op_name):
    xp = backend.get_array_module(inputs[0].data)
    for t in inputs[1:]:
        other = backend.get_array_module(t.data)
        if other is not xp:
            raise DeviceError(f"{op_name}: operands on different devices ({inputs[0].device} and {t.device}); "
                              "move one with .to(device)")
    return xp


def unbroadcast(grad, shape):
    """Sum `grad` back down to `shape`, undoing NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_node", "name", "__weakref__")

    def __init__(self, data, requires_grad: bool = False, dtype=None, device: str | None = None, name=None):
        if isinstance(data, Tensor):
            data = data.data
        if device is not None:
            xp = backend.xp_for(backend.resolve_device(device))
            data = backend.to_device(data, "cuda" if xp is not np else "cpu") if hasattr(data, "dtype") \
                else xp.asarray(data)
        elif isinstance(data, np.generic):          # NumPy scalars from full reductions
            data = np.asarray(data)
        elif not hasattr(data, "dtype"):            # Python numbers and lists: float32 by default
            data = np.asarray(data)
            if data.dtype == np.float64 and dtype is None:
                data = data.astype(np.float32)
        if dtype is not None:
            dtype = backend.as_dtype(dtype)
            if data.dtype != dtype:
                data = data.astype(dtype)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self.name = name

    @property
    def _ctx(self):
        """The Function that made this tensor (None for a leaf, and once the backward has run)."""
        return None if self._node is None else self._node._ctx

    @_ctx.setter
    def _ctx(self, fn):
        if self._node is not None:
            self._node._ctx = fn
        elif fn is not None:
            self._node = _Node(fn, self.data.shape)

    # ------------------------------------------------------------ basics
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def xp(self):
        return backend.get_array_module(self.data)

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"

    def numpy(self) -> np.ndarray:
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise LlamacError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def to(self, target=None, dtype=None) -> "Tensor":
        """.to('cuda'), .to('float32'), .to('cpu', 'bfloat16'). Differentiable for dtype changes."""
        is_device = isinstance(target, str) and (target.lower() in ("cpu", "cuda", "gpu", "auto")
                                                 or target.startswith("cuda:"))
        device = backend.resolve_device(target) if is_device else None
        dt = dtype if is_device or dtype is not None else target
        out = self
        if device is not None and device != self.device:
            out = Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)
        if dt is not None and backend.as_dtype(dt) != out.dtype:
            out = out.cast(backend.as_dtype(dt))
        return out

    def float(self) -> "Tensor":
        return self.to(dtype="float32")

    # ------------------------------------------------------------ autograd
    def backward(self, dout=None, retain_graph: bool = False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad."""
        xp = self.xp
        if dout is None:
            if self.data.size != 1:
                raise LlamacError(f"backward() on a non-scalar tensor of shape {self.shape} needs dout "
                                  "(the gradient of the output)")
            dout = xp.ones_like(self.data)
            unit_seed = True
        else:
            unit_seed = False
            dout = dout.data if isinstance(dout, Tensor) else xp.asarray(dout, dtype=self.dtype)
            if dout.shape != self.shape:
                raise LlamacError(f"backward(): dout shape {dout.shape} does not match tensor shape {self.shape}")
        if not self.requires_grad:
            raise LlamacError("backward() on a tensor that does not require grad")
        root = self._ctx
        if root is not None:
            # Whether the root's gradient is backward()'s own 1: a Function that scales gradients it
            # made in its forward (head_loss.HeadLoss) may skip multiplying by it. Only for this call.
            root.unit_grad = unit_seed
        grads = {id(self): dout}
        order = _topological_order(self)
        hook = getattr(_state, "grad_ready", None)
        # A leaf's gradient is final once every Function reading it has run its backward; with a
        # grad_ready hook it is stored (and the hook called) right then rather than when the walk
        # reaches the leaf, which can be the very end (data parallel starts reducing it at once).
        pending = _leaf_uses(order) if hook is not None else None
        _state.grad_ready = None     # a nested backward (recomputation) reports nothing itself
        try:
            self._walk(order, grads, xp, retain_graph, pending, hook)
        finally:
            _state.grad_ready = hook
        if root is not None:
            root.unit_grad = False

    def _walk(self, order, grads, xp, retain_graph, pending, hook):
        reported = set()
        for node in reversed(order):
            grad = grads.pop(id(node), None)
            fn = node._ctx
            if fn is None:
                if isinstance(node, _Node):     # an intermediate whose graph an earlier backward freed
                    continue
                if grad is not None:
                    _accumulate(node, grad)
                if pending is not None and id(node) not in reported:
                    # a leaf whose readers did not all run a backward (no gradient reached them),
                    # or the root itself: final now that the walk reaches it
                    pending.pop(id(node), None)
                    hook(node)
                continue
            if grad is None:
                continue
            if xp is np and grad.dtype in _LOW_PRECISION:
                grad = grad.astype(np.float32)
            input_grads = fn.backward(grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for inp, g, needed in zip(fn.inputs, input_grads, fn.needs_grad):
                if not needed or g is None:
                    continue
                if g.shape != inp.shape:
                    g = unbroadcast(g, inp.shape)
                key = id(inp)
                grads[key] = g if key not in grads else grads[key] + g
            if pending is not None:
                for inp, needed in zip(fn.inputs, fn.needs_grad):
                    key = id(inp)
                    if needed and key in pending:
                        pending[key] -= 1
                        if pending[key] == 0:        # its last reader is done: the gradient is final
                            del pending[key]
                            reported.add(key)
                            if key in grads:
                                _accumulate(inp, grads.pop(key))
                            hook(inp)
            if not retain_graph:
                node._ctx = None
                fn.saved = None
                fn.inputs = None

    def zero_grad(self):
        self.grad = None

    # ------------------------------------------------------------ operators
    def _lift(self, other) -> "Tensor":
        if isinstance(other, Tensor):
            return other
        xp = self.xp
        if isinstance(other, (int, float, bool)):
            dtype = self.dtype if backend.is_float(self.dtype) or isinstance(other, int) else np.float32
            return Tensor(xp.asarray(other, dtype=dtype))
        if backend.get_array_module(other) is not xp:
            raise DeviceError(f"cannot combine a {self.device} tensor with a {backend.device_of(other)} array")
        return Tensor(other)

    def _compare(self, other, op):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other))

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def eq(self, other):
        return self._compare(other, lambda a, b: a == b)

    __hash__ = object.__hash__


def _accumulate(leaf: Tensor, grad):
    if grad.dtype != leaf.data.dtype:
        grad = grad.astype(leaf.data.dtype)
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def _leaf_uses(order: list) -> dict:
    """id(leaf) -> how many (Function, input) edges read it, over the graph being walked."""
    uses = {}
    for node in order:
        fn = node._ctx
        if fn is not None:
            for inp, needed in zip(fn.inputs, fn.needs_grad):
                if needed and inp._ctx is None and not isinstance(inp, _Node):
                    uses[id(inp)] = uses.get(id(inp), 0) + 1
    return uses


@contextlib.contextmanager
def grad_ready(hook):
    """Call hook(leaf) inside every backward of the block, once per leaf that needs a gradient, as
    soon as that gradient is final: its last reader has run (a Function may also have added into
    leaf.grad in place and returned None). Nested backwards (recomputation) call it only through
    their outer walk. Data parallel training reduces gradients in buckets with it while the rest
    of the backward still runs."""
    previous = getattr(_state, "grad_ready", None)
    _state.grad_ready = hook
    try:
        yield
    finally:
        _state.grad_ready = previous


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _topological_order(root: Tensor) -> list:
    """Nodes that need a gradient, inputs before outputs (iterative: graphs can be deep)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        fn = node._ctx
        if fn is not None:
            for parent in fn.inputs:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


# ---------------------------------------------------------------- factories

_rng_state = threading.local()


def manual_seed(seed: int):
    """Seed the generators behind randn/rand/dropout on every device."""
    _rng_state.cpu = np.random.default_rng(seed)
    if backend.cuda_available():
        _rng_state.cuda = backend.cupy_module().random.default_rng(seed)


def generator(device: str = "cpu"):
    gen = getattr(_rng_state, device, None)
    if gen is None:
        xp = backend.xp_for(device)
        gen = xp.random.default_rng()
        setattr(_rng_state, device, gen)
    return gen


def _factory(make):
    @functools.wraps(make)
    def wrapper(*shape, dtype="float32", device="cpu", requires_grad=False, **kw):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        device = backend.resolve_device(device)
        data = make(backend.xp_for(device), shape, backend.as_dtype(dtype), device, **kw)
        return Tensor(data, requires_grad=requires_grad)
    return wrapper


@_factory
def zeros(xp, shape, dtype, device):
    return xp.zeros(shape, dtype=dtype)


@_factory
def ones(xp, shape, dtype, device):
    return xp.ones(shape, dtype=dtype)


@_factory
def randn(xp, shape, dtype, device, std=1.0):
    return (generator(device).standard_normal(shape, dtype=np.float32) * std).astype(dtype)


@_factory
def rand(xp, shape, dtype, device):
    return generator(device).random(shape, dtype=np.float32).astype(dtype)


def full(shape, value, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    xp = backend.xp_for(backend.resolve_device(device))
    return Tensor(xp.full(shape, value, dtype=backend.as_dtype(dtype)), requires_grad=requires_grad)


def arange(start, stop=None, step=1, dtype="int64", device="cpu") -> Tensor:
    if stop is None:
        start, stop = 0, start
    xp = backend.xp_for(backend.resolve_device(device))
    return Tensor(xp.arange(start, stop, step, dtype=backend.as_dtype(dtype)))


def tensor(data, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.xp_for(backend.resolve_device(device))
    if dtype is None and not hasattr(data, "dtype"):
        array = np.asarray(data)
        dtype = np.float32 if array.dtype == np.float64 else array.dtype
    array = xp.asarray(backend.to_numpy(data) if hasattr(data, "get") and xp is np else data,
                       dtype=backend.as_dtype(dtype) if dtype is not None else None)
    return Tensor(array, requires_grad=requires_grad)


