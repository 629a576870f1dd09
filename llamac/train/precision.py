"""train.dtype as it runs: bf16 on the GPU (the model in bf16, fp32 masters in AdamW), bf16 matrix
products on a CPU that multiplies bf16 natively (the model stays fp32), fp32 otherwise."""
from __future__ import annotations

from llamac.config import Recipe
from llamac.engine import onednn
from llamac.model.llama import Llama


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """train.dtype as it will run, fp32 or bf16, and why. auto: bf16 on the GPU, and on a CPU that
    multiplies bf16 natively (avx512_bf16 / amx_bf16) with oneDNN installed; fp32 otherwise.
    On the CPU bf16 means bf16 matrix products (llamac.engine.onednn); the model stays fp32."""
    if dtype == "fp32":
        return "fp32", "as set"
    if device != "cpu":
        return "bf16", "the GPU computes in bf16, AdamW keeps fp32 master weights"
    missing = onednn.unavailable()
    if missing is not None:
        return "fp32", f"no bf16 products on this CPU: {missing}"
    return "bf16", (f"matrix products in bf16 through oneDNN ({', '.join(onednn.native_bf16_flags())}), "
                    "the rest in fp32")


def compute_precision(model: Llama, recipe: Recipe, device: str) -> Llama:
    """train.dtype bf16 (or auto) on the GPU: the model computes in bf16 (the optimizer keeps fp32
    masters). On the CPU the model stays fp32: its products run in bf16 inside the trainer's steps."""
    if device == "cuda" and resolve_dtype(recipe.train.dtype, device)[0] == "bf16":
        model.to(dtype="bfloat16")
    return model
