"""Tensor's arithmetic operators (x + y, x @ w, x[i], ...) and cast, attached to Tensor here because
they are primitive ops (llamac.engine.ops), which themselves build on Tensor."""
from __future__ import annotations

import types

from llamac.engine.matmul import MatMul
from llamac.engine.ops import Add, AddScalar, Cast, Div, GetItem, Mul, MulScalar, Neg, Pow, PowScalar, Sub
from llamac.engine.tensor import Tensor, _is_number


class _Operators:
    def __add__(self, other):
        if _is_number(other):
            return AddScalar.apply(self, c=other)
        return Add.apply(self, self._lift(other))

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        if _is_number(other):
            return self.__add__(-other)
        return Sub.apply(self, self._lift(other))

    def __rsub__(self, other):
        if _is_number(other):
            return (-self).__add__(other)
        return Sub.apply(self._lift(other), self)

    def __mul__(self, other):
        if _is_number(other):
            return MulScalar.apply(self, c=other)
        return Mul.apply(self, self._lift(other))

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        if _is_number(other):
            return self.__mul__(1.0 / other)
        return Div.apply(self, self._lift(other))

    def __rtruediv__(self, other):
        return Div.apply(self._lift(other), self)

    def __pow__(self, exponent):
        if isinstance(exponent, (int, float)):
            return PowScalar.apply(self, exponent=float(exponent))
        return Pow.apply(self, self._lift(exponent))

    def __rpow__(self, base):
        return Pow.apply(self._lift(base), self)

    def __matmul__(self, other):
        return MatMul.apply(self, self._lift(other))

    def __rmatmul__(self, other):
        return MatMul.apply(self._lift(other), self)

    def __neg__(self):
        return Neg.apply(self)

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        return GetItem.apply(self, index=index)

    # comparisons give plain (non-differentiable) boolean tensors

    def cast(self, dtype):
        return Cast.apply(self, dtype=dtype)


for _name, _method in vars(_Operators).items():
    if isinstance(_method, types.FunctionType):
        setattr(Tensor, _name, _method)
