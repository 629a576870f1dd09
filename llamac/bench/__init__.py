"""`llamac bench` (run) and its measurements: kernels, flash attention, decode, the PyTorch references."""
