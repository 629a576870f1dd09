"""The engine: NumPy or CuPy arrays (backend), Tensors with reverse-mode autograd (tensor), primitive ops
(ops) and the functions users call on Tensors (functional, which also attaches x.sum(), x.reshape(), ...)."""
from llamac.engine import (  # noqa: F401 - operators and functional attach Tensor methods
    functional,
    operators,
    ops,
    tensor,
)
