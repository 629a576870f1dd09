"""Runtime options: the switches between a fused fast path and its plain counterpart, and the
environment variables llamac reads, as one typed, documented set of settings.

They change speed or memory, never results beyond rounding, so they are not recipe keys: the
defaults are the fast paths, tests and benchmarks turn them off to compare. cpu_bf16_products is
the one that a recipe sets (train.dtype bf16 on the CPU: the trainer turns it on for its steps). Read them with
`options()`; change them for a block with `override(...)`:

    with runtime.override(flash_attention=False):
        logits, _ = model(idx)

gemm_autotune, cpu_malloc_tuning, kernel_dir and onednn_library take effect once per process (the
cuBLASLt handle, the malloc settings, the kernel folder and oneDNN are set up on first use), so set them through
the environment before llamac starts; override() changes the others at any time.

Environment variables (read once, when llamac.runtime is first imported):
    LLAMAC_GEMM_AUTOTUNE=0   keep cuBLAS's first GEMM algorithm instead of timing its proposals
    LLAMAC_CPU_THREADS=N     threads for the CPU's row blocks and GEMMs (default: every core)
    LLAMAC_CPU_MALLOC=0      leave glibc's malloc settings alone
    LLAMAC_KERNELS=DIR       where kernels/*.cu are read from
    LLAMAC_ONEDNN=FILE       the oneDNN library for the CPU's bf16 products (default: libdnnl.so.3 from
                             the onednn-cpu-gomp wheel in this environment)
    LLAMAC_DIST_TIMEOUT=S    data parallel: seconds a collective, or a rank's heartbeat, may stall before
                             the job is ended (default 600)
    LLAMAC_DP_BUCKET_MB=N    data parallel: megabytes of gradients reduced together (default 25)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional


def _env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0") != "0"


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value else None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass
class Options:
    # GPU attention (bf16/fp16, supported head sizes) through the flash kernels; off: the reference
    # Attention with its T x T mask everywhere.
    flash_attention: bool = True
    # GPU training: q | k | v from one stacked GEMM, RoPE's backward folded into the flash backward.
    packed_qkv: bool = True
    # GPU: each residual add runs inside the RMSNorm after it.
    fuse_residuals: bool = True
    # GPU training: the LM head and its loss in row chunks, so that the logits never exist whole.
    fused_head_loss: bool = True
    # Bytes of logits one chunk of the fused head loss holds.
    head_loss_chunk_bytes: int = 1 << 30
    # GPU: the plain loss's backward writes the logits' gradient over the logits.
    overwrite_logits: bool = True
    # GPU: SwiGLU's product recomputed in its backward instead of kept for the down projection's.
    swiglu_recompute: bool = True
    # GPU RMSNorm: each lane keeps its share of a row in registers between the kernel's passes.
    rmsnorm_register_cache: bool = True
    # CPU: matrix products (projections, attention's) multiply in bf16 and accumulate in fp32
    # (llamac.engine.onednn) where the processor and oneDNN can; fp32 NumPy/OpenBLAS otherwise.
    cpu_bf16_products: bool = False
    # GPU decode: each kernel of a step may start while the one before it finishes (programmatic
    # dependent launch), its weight loads overlapping that kernel's tail.
    overlapped_launch: bool = True
    gemm_autotune: bool = dataclasses.field(default_factory=lambda: _env_flag("LLAMAC_GEMM_AUTOTUNE", True))
    cpu_threads: Optional[int] = dataclasses.field(default_factory=lambda: _env_int("LLAMAC_CPU_THREADS"))
    cpu_malloc_tuning: bool = dataclasses.field(default_factory=lambda: _env_flag("LLAMAC_CPU_MALLOC", True))
    kernel_dir: Optional[str] = dataclasses.field(default_factory=lambda: os.environ.get("LLAMAC_KERNELS"))
    onednn_library: Optional[str] = dataclasses.field(default_factory=lambda: os.environ.get("LLAMAC_ONEDNN"))
    dist_timeout: float = dataclasses.field(default_factory=lambda: _env_float("LLAMAC_DIST_TIMEOUT", 600.0))
    dp_bucket_mb: float = dataclasses.field(default_factory=lambda: _env_float("LLAMAC_DP_BUCKET_MB", 25.0))


_options = Options()


def options() -> Options:
    return _options


@contextlib.contextmanager
def override(**changes):
    """Set options for the duration of a with-block (unknown names are an error)."""
    global _options
    saved = _options
    _options = dataclasses.replace(saved, **changes)
    try:
        yield _options
    finally:
        _options = saved
