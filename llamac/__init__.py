"""llamac: a Llama-family LLM toolchain on its own tensor/autograd engine."""
from llamac.engine import functional
from llamac.engine.functional import (
    cat,
    concatenate,
    cross_entropy,
    dropout,
    log_softmax,
    masked_fill,
    softmax,
    split,
    stack,
    where,
)
from llamac.engine.tensor import Function, Tensor, arange, full, manual_seed, no_grad, ones, rand, randn, tensor, zeros
from llamac.errors import LlamacError

__all__ = ["LlamacError", "Tensor", "Function", "no_grad", "manual_seed", "tensor", "zeros", "ones", "randn", "rand",
           "full", "arange", "functional", "cat", "concatenate", "cross_entropy", "dropout", "log_softmax",
           "masked_fill", "softmax", "split", "stack", "where"]
__version__ = "0.1.0"


def __getattr__(name):
    # The tokenizer pulls in sentencepiece: load it only when asked for.
    if name == "Tokenizer":
        from llamac.data.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llamac' has no attribute {name!r}")
