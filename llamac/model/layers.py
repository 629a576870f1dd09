"""Modules: a parameter registry with state dicts, train/eval mode and device/dtype moves."""
from __future__ import annotations

import math

import numpy as np

from llamac.engine import backend, functional
from llamac.engine.tensor import Tensor, generator
from llamac.errors import LlamacError
from llamac.ops import embedding, linear, rmsnorm


class Parameter(Tensor):
    """A Tensor a Module owns and an optimizer updates."""
    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Parameters and sub-modules are found by walking attributes in assignment order."""

    training = True

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _children(self):
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}.{i}", v

    def named_parameters(self, prefix: str = ""):
        for name, value in self._children():
            full = f"{prefix}{name}"
            if isinstance(value, Parameter):
                yield full, value
            else:
                yield from value.named_parameters(full + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_modules(self, prefix: str = ""):
        yield prefix.rstrip("."), self
        for name, value in self._children():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}{name}.")

    def num_params(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    def state_dict(self) -> dict:
        """name -> xp array (the live arrays: copy before mutating)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True):
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
            raise LlamacError(f"state dict does not fit the model: {'; '.join(parts)}")
        for name, p in params.items():
            if name not in state:
                continue
            value = state[name]
            if tuple(value.shape) != p.shape:
                raise LlamacError(f"state dict entry '{name}' has shape {tuple(value.shape)}, the model wants {p.shape}")
            value = backend.to_device(value, p.device) if hasattr(value, "dtype") else np.asarray(value)
            p.data = value.astype(p.dtype, copy=True)
        return self._after_move()

    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, device: str | None = None, dtype=None):
        """Move parameters (in place) to a device and/or cast the floating ones to dtype."""
        device = backend.resolve_device(device) if device is not None else None
        dtype = backend.as_dtype(dtype) if dtype is not None else None
        for p in self.parameters():
            data = p.data
            if device is not None:
                data = backend.to_device(data, device)
            if dtype is not None and backend.is_float(data.dtype):
                data = data.astype(dtype)
            p.data = data
            p.grad = None
        return self._after_move()

    def _after_move(self):
        """Lets each module lay its new arrays out as it wants (Module.after_move, if it has one)."""
        for _, m in self.named_modules():
            hook = getattr(m, "after_move", None)
            if hook is not None:
                hook()
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None


def normal_(p: Parameter, std: float):
    """In-place N(0, std^2) init from llamac's seeded generator (reproducible given manual_seed)."""
    values = (generator("cpu").standard_normal(p.shape, dtype=np.float32) * std).astype(p.dtype)
    p.data = backend.to_device(values, p.device)
    return p


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        bound = 1 / math.sqrt(in_features)   # torch's default: U(-1/sqrt(in), 1/sqrt(in))
        w = generator("cpu").uniform(-bound, bound, (out_features, in_features)).astype(np.float32)
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        return linear.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int):
        self.weight = Parameter(generator("cpu").standard_normal((num_embeddings, dim), dtype=np.float32))

    def forward(self, ids):
        return embedding.embedding(ids, self.weight)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, np.float32))

    def forward(self, x):
        return rmsnorm.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    def __init__(self, p: float = 0.1):
        self.p = p

    def forward(self, x):
        return functional.dropout(x, self.p, self.training)
