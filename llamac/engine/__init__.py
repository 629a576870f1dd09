"""The engine: NumPy or CuPy arrays (backend), Tensors with reverse-mode autograd (tensor), primitive ops
(ops) and the functions users call on Tensors (functional, which also attaches x.sum(), x.reshape(), ...)."""
from llamac.engine import functional, ops, tensor  # noqa: F401 - in this order: functional needs tensor and ops
