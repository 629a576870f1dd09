"""llamac: a Llama-family LLM toolchain on its own tensor/autograd engine."""
from llamac.errors import LlamacError
from llamac.engine import Tensor, Function, no_grad, manual_seed, tensor, zeros, ones, randn, rand, full, arange
from llamac import functional, ops
from llamac.functional import (cat, concatenate, cross_entropy, dropout, log_softmax, masked_fill, softmax, split, stack,
                        where)

__version__ = "0.1.0"


def __getattr__(name):
    # The tokenizer pulls in sentencepiece: load it only when asked for.
    if name == "Tokenizer":
        from llamac.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llamac' has no attribute {name!r}")
