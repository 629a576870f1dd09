"""llamac: a Llama-family LLM toolchain on its own tensor/autograd engine."""
from llamac.errors import LlamacError

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import llamac` stays cheap for the CLI and works piecewise while modules are built.
    if name in ("Tensor", "no_grad", "tensor", "zeros", "ones", "randn", "arange"):
        from llamac import tensor as _tensor
        return getattr(_tensor, name)
    if name == "Tokenizer":
        from llamac.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llamac' has no attribute {name!r}")
