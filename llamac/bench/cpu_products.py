"""The CPU's bf16 matrix products alone: llamac's (the engine's matmul with bf16 products on: fp32
operands rounded to bf16, multiplied) against oneDNN's own bf16 matmul primitive on operands
already in bf16, NumPy fp32 and PyTorch bf16 (operands already in bf16), at the tiny recipe's
shapes and one larger one."""
from __future__ import annotations

import time

import numpy as np

from llamac import runtime
from llamac.engine import onednn
from llamac.engine.matmul import matmul

def best_seconds(fn, reps: int) -> float:
    """The fastest of `reps` calls after two warm-ups: on a shared machine the least disturbed one."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


SHAPES = ((2048, 256, 768), (2048, 256, 4096), (2048, 688, 256), (8192, 1024, 1024))   # M x K x N


def bench_cpu_products(compare_torch: bool = True, reps: int = 10, shapes=SHAPES) -> list[dict]:
    """TFLOP/s of out = a @ b per shape and implementation; `of_onednn` is llamac's rate over the
    primitive's own (the cost of rounding the operands to bf16 and of llamac's dispatch: the
    engine's checks, the cache, the ctypes calls)."""
    rng = np.random.default_rng(0)
    rows = []
    for M, K, N in shapes:
        a, b = rng.standard_normal((M, K), np.float32), rng.standard_normal((K, N), np.float32)
        out = np.empty((M, N), np.float32)
        flop = 2.0 * M * N * K
        with runtime.override(cpu_bf16_products=True):
            ours = best_seconds(lambda: matmul(a, b, out=out), reps)
        product = onednn.primitive_for(a, b, out)
        product(a, b, out)                              # the operands in bf16, for the matmul alone
        theirs = best_seconds(product.multiply, reps)
        shape = f"{M}x{K}x{N}"
        rows.append({"section": "cpu_products", "shape": shape, "impl": "llamac bf16 (oneDNN)",
                     "tflops": round(flop / ours / 1e12, 3), "of_onednn": round(theirs / ours, 3)})
        rows.append({"section": "cpu_products", "shape": shape, "impl": "oneDNN primitive bf16",
                     "tflops": round(flop / theirs / 1e12, 3), "kernel": product.implementation})
        rows.append({"section": "cpu_products", "shape": shape, "impl": "NumPy fp32",
                     "tflops": round(flop / best_seconds(lambda: np.matmul(a, b, out=out), reps) / 1e12, 3)})
        if compare_torch:
            try:
                import torch
            except ImportError:
                continue
            ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
            rows.append({"section": "cpu_products", "shape": shape, "impl": f"torch {torch.__version__} bf16",
                         "tflops": round(flop / best_seconds(lambda: ta @ tb, reps) / 1e12, 3)})
    return rows
