"""Flash attention: the tensor-core forward kernel (kernels/flash_attn_fwd.cu) beside its xp references.

Shapes: q (B, Tq, H, hs); k, v (B, Tk, Hkv, hs) with H a multiple of Hkv (grouped-query:
query head h reads kv head h // (H // Hkv)). Queries sit at absolute positions Tk - Tq .. Tk - 1
(a KV-cache prefill when Tq < Tk). Key j is visible to query i iff
    (not causal or j <= i + Tk - Tq) and (segments is None or segments[b, j] == segments[b, i + Tk - Tq]),
`segments` being (B, Tk) integer document ids. scale = 1 / sqrt(hs). Every function returns
(out, lse) or gradients; lse (B, H, Tq) float32 is the natural-log logsumexp of the scaled,
masked scores, which is all the backward needs to rebuild the probabilities.

The kernel never materialises anything of size Tq x Tk. The references (forward and backward,
shared with llamac.ops.flash_backward) hold the full (B, H, Tq, Tk) scores in fp32 (fp64 for fp64
inputs): they are for tests, small sizes and the CPU. Nothing here imports cupy."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from llamac.engine import backend
from llamac.errors import LlamacError, ShapeError

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"flash_attn_fwd": ("flash_attn_forward",)}   # bf16/fp16 only: the fp32 build traps

HEAD_DIMS = (32, 48, 64, 96, 128)   # the kernel's compiled head sizes (48: the 15M model's 288 / 6)


class KernelConfig(NamedTuple):
    """Compile-time shape of the kernel (kernels/flash_attn_fwd.cu's FLASH_* options)."""
    warps: int          # warps per CTA
    mt: int             # 16-row query tiles per warp: 2 reads each K/V fragment once for 32 rows
    q_smem: bool        # re-read Q fragments from shared memory per tile instead of holding them
    bn: int             # keys per K/V tile
    min_blocks: int     # __launch_bounds__ CTAs per SM (caps registers)
    stages: int = 1     # 2: double-buffered K/V tiles, one barrier per tile
    lazy: bool = False  # rescale the output accumulators only when a row max of the warp moved
    wgmma: bool = False  # Hopper warpgroup MMA for both products (hs 64, mt 1, stages 2; an sm_90a build)

    @property
    def block_m(self) -> int:
        return 16 * self.mt * self.warps

    @property
    def arch(self) -> str | None:
        """The build target when it must be named: wgmma exists only for sm_90a (H100/H200)."""
        return "sm_90a" if self.wgmma else None

    def options(self, hs: int) -> tuple:
        return (f"-DHEAD_DIM={hs}", f"-DFLASH_WARPS={self.warps}", f"-DFLASH_MT={self.mt}",
                f"-DFLASH_Q_SMEM={int(self.q_smem)}", f"-DFLASH_BN={self.bn}", f"-DFLASH_MIN_BLOCKS={self.min_blocks}",
                f"-DFLASH_STAGES={self.stages}", f"-DFLASH_LAZY={int(self.lazy)}") + (("-DLLAMAC_WGMMA",) if self.wgmma else ())

    def smem_bytes(self, hs: int, itemsize: int) -> int:
        return (self.block_m + 2 * self.stages * self.bn) * smem_row(hs) * itemsize


def smem_row(hs: int) -> int:
    """Elements per shared-memory row of a Q/K/V tile: hs when a multiple of 64 (swizzled in
    place), else hs + 8 (padded by one 16-byte chunk: kernels/flash_attn_fwd.cu's SD)."""
    return hs if hs % 64 == 0 else hs + 8


# Per head size, the fastest of CANDIDATES, chosen by timing every candidate (numbers, devices and dates
# in BENCHMARKS.md): FA2's 4 warps x 32 query rows (each K/V fragment read once per 32 rows, two CTAs per
# SM), Q re-read from shared memory to make room for the accumulators, K/V double-buffered.
# hs=128 needs 32-key tiles to fit 255 registers without spilling.
CONFIGS = {64: KernelConfig(warps=4, mt=2, q_smem=True, bn=64, min_blocks=1, stages=2, lazy=True),
           128: KernelConfig(warps=4, mt=2, q_smem=True, bn=32, min_blocks=1, stages=2, lazy=True)}
# hs=48 (the 15M model): the fastest at its training shape (B=128, H=6, T=256), close to the best at
# T=2048. hs=32 takes hs=64's shape, hs=96 hs=128's (timed only as defaults).
CONFIGS.update({48: KernelConfig(warps=8, mt=1, q_smem=False, bn=64, min_blocks=2), 32: CONFIGS[64], 96: CONFIGS[128]})
# Hopper (compute capability 9.0 exactly: the sm_90a build runs nowhere else) takes both products to
# warpgroup MMA at hs=64: two warpgroups of 64 rows and 64-key tiles, lazy rescaling (117 registers,
# two CTAs an SM), the fastest of HOPPER_CANDIDATES (numbers, and a variant tried and dropped, in BENCHMARKS.md).
HOPPER_CONFIGS = {64: KernelConfig(warps=8, mt=1, q_smem=True, bn=64, min_blocks=2, stages=2, lazy=True, wgmma=True)}
HOPPER_CANDIDATES = {64: [KernelConfig(warps=4, mt=1, q_smem=True, bn=64, min_blocks=4, stages=2, wgmma=True),
                          KernelConfig(warps=8, mt=1, q_smem=True, bn=64, min_blocks=2, stages=2, wgmma=True),
                          KernelConfig(warps=8, mt=1, q_smem=True, bn=128, min_blocks=1, stages=2, wgmma=True),
                          HOPPER_CONFIGS[64]]}


def default_config(hs: int, device_id: int = 0) -> KernelConfig:
    """The fastest measured kernel shape for hs on this GPU: HOPPER_CONFIGS on compute capability
    9.0, else CONFIGS."""
    if hs in HOPPER_CONFIGS and backend.compute_capability(device_id) == "90":
        return HOPPER_CONFIGS[hs]
    return CONFIGS[hs]


# Alternatives the GPU tests check and the benchmark can time (none spills registers at sm_90).
C = KernelConfig
CANDIDATES = {
    64: [C(warps=8, mt=1, q_smem=False, bn=64, min_blocks=2),
         C(warps=4, mt=2, q_smem=False, bn=32, min_blocks=1),
         C(warps=4, mt=2, q_smem=True, bn=64, min_blocks=1),
         C(warps=8, mt=2, q_smem=False, bn=32, min_blocks=1),
         C(warps=4, mt=2, q_smem=False, bn=32, min_blocks=1, stages=2),
         C(warps=8, mt=2, q_smem=False, bn=32, min_blocks=1, stages=2),
         C(warps=4, mt=1, q_smem=False, bn=64, min_blocks=3, stages=2),
         C(warps=4, mt=2, q_smem=True, bn=64, min_blocks=1, stages=2),
         C(warps=4, mt=2, q_smem=True, bn=64, min_blocks=1, stages=2, lazy=True),
         C(warps=4, mt=1, q_smem=False, bn=64, min_blocks=3, stages=2, lazy=True)],
    128: [C(warps=8, mt=1, q_smem=False, bn=64, min_blocks=1),
          C(warps=4, mt=2, q_smem=True, bn=32, min_blocks=1),
          C(warps=8, mt=1, q_smem=True, bn=64, min_blocks=1),
          C(warps=8, mt=2, q_smem=True, bn=32, min_blocks=1),
          C(warps=8, mt=1, q_smem=False, bn=64, min_blocks=1, stages=2),
          C(warps=4, mt=2, q_smem=True, bn=32, min_blocks=1, stages=2),
          C(warps=8, mt=1, q_smem=True, bn=64, min_blocks=1, stages=2),
          C(warps=8, mt=2, q_smem=True, bn=32, min_blocks=1, stages=2),
          C(warps=4, mt=2, q_smem=True, bn=32, min_blocks=1, stages=2, lazy=True),
          C(warps=8, mt=1, q_smem=False, bn=64, min_blocks=1, stages=2, lazy=True),
          C(warps=8, mt=2, q_smem=True, bn=32, min_blocks=1, stages=2, lazy=True)],
}
# The small head sizes have room for Q in registers with 64-key tiles (226 registers at hs=48).
CANDIDATES[48] = CANDIDATES[64] + [C(warps=4, mt=2, q_smem=False, bn=64, min_blocks=1, stages=2, lazy=True)]
CANDIDATES[32] = CANDIDATES[48]
CANDIDATES[96] = CANDIDATES[128]
del C


# ---------------------------------------------------------------- checks

def _check(q, k, v, segments):
    """(B, Tq, Tk, H, Hkv, hs) after checking shapes; one-line errors."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"flash attention: q, k, v must be (B, T, heads, hs), got {q.shape}, {k.shape}, {v.shape}")
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hs or Hkv == 0 or H % Hkv:
        raise ShapeError(f"flash attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         "(k and v equal, same batch and head size, query heads a multiple of kv heads)")
    if Tq > Tk:
        raise ShapeError(f"flash attention: {Tq} queries but only {Tk} keys (queries are the last Tq of Tk)")
    if segments is not None and tuple(segments.shape) != (B, Tk):
        raise ShapeError(f"flash attention: segments {tuple(segments.shape)} must be (B, Tk) = {(B, Tk)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise LlamacError(f"flash attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return B, Tq, Tk, H, Hkv, hs


# ---------------------------------------------------------------- references (xp, fp32; fp64 for fp64)

def compute_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def visible_mask(xp, Tq: int, Tk: int, causal: bool = True, segments=None):
    """(B or 1, 1, Tq, Tk) bool: key j visible to query i (at position Tk - Tq + i), or None if all are."""
    visible = None
    if causal:
        qpos = xp.arange(Tk - Tq, Tk)[:, None]
        visible = (xp.arange(Tk)[None, :] <= qpos)[None]                 # (1, Tq, Tk)
    if segments is not None:
        segments = xp.asarray(segments)
        same = segments[:, Tk - Tq:, None] == segments[:, None, :]       # (B, Tq, Tk)
        visible = same if visible is None else visible & same
    return None if visible is None else visible[:, None]                 # (B|1, 1, Tq, Tk)


def _heads_first(xp, x, ct):
    return xp.ascontiguousarray(x.transpose(0, 2, 1, 3).astype(ct, copy=False))   # (B, H, T, hs)


def _scores(q, k, causal, segments):
    """The scaled scores (B, H, Tq, Tk) with -inf where masked, the mask, and head-first
    compute-dtype copies of q (B, H, Tq, hs) and of k repeated over the G query heads (B, H, Tk, hs)."""
    xp = backend.get_array_module(q)
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    ct = compute_dtype(q.dtype)
    qh = _heads_first(xp, q, ct)                                          # (B, H, Tq, hs)
    kh = xp.repeat(_heads_first(xp, k, ct), G, axis=1)                    # (B, H, Tk, hs)
    scores = qh @ kh.swapaxes(-1, -2)                                     # (B, H, Tq, Tk)
    scores *= ct.type(1.0 / math.sqrt(hs))
    mask = visible_mask(xp, Tq, Tk, causal, segments)
    if mask is not None:
        scores = xp.where(mask, scores, ct.type(-np.inf))
    return scores, mask, qh, kh


def _check_shapes(op, q, k, v, segments=None):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ShapeError(f"{op}: q {q.shape}, k {k.shape}, v {v.shape} must be (B, Tq, H, hs) and two equal (B, Tk, Hkv, hs)")
    B, Tq, H, hs = q.shape
    if k.shape[0] != B or k.shape[3] != hs or k.shape[2] == 0 or H % k.shape[2]:
        raise ShapeError(f"{op}: q {q.shape} does not fit k {k.shape} (same B and hs, H a multiple of Hkv)")
    if Tq > k.shape[1]:
        raise ShapeError(f"{op}: q has {Tq} positions but k only {k.shape[1]}; queries are the last Tq of the Tk keys")
    if segments is not None and tuple(segments.shape) != (B, k.shape[1]):
        raise ShapeError(f"{op}: segments has shape {tuple(segments.shape)}, expected (B, Tk) = {(B, k.shape[1])}")


def attention_forward_reference(q, k, v, causal=True, segments=None):
    """(out (B, Tq, H, hs), lse (B, H, Tq)) in fp32 (fp64 for fp64 inputs), with xp."""
    _check_shapes("attention_forward_reference", q, k, v, segments)
    xp = backend.get_array_module(q)
    G = q.shape[2] // k.shape[2]
    scores, _, _, _ = _scores(q, k, causal, segments)
    m = scores.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)                # a row with no visible key: lse = -inf, out = 0
    p = xp.exp(scores - m)
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (xp.log(total) + m)[..., 0]                                  # (B, H, Tq)
        p /= xp.where(total > 0, total, 1)
    vh = xp.repeat(_heads_first(xp, v, scores.dtype), G, axis=1)          # (B, H, Tk, hs)
    out = (p @ vh).transpose(0, 2, 1, 3)                                  # (B, Tq, H, hs)
    return xp.ascontiguousarray(out), lse


def attention_backward_reference(q, k, v, out, dout, lse, causal=True, segments=None):
    """(dq, dk, dv) of sum(dout * attention(q, k, v)) in fp32 (fp64 for fp64 inputs), with xp.

    Uses the same recipe as the kernel: P = exp(S - lse), D = rowsum(dout * out),
    dS = P (dP - D); dk, dv summed over the G query heads that share a kv head.
    """
    _check_shapes("attention_backward_reference", q, k, v, segments)
    xp = backend.get_array_module(q)
    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scores, _, qh, kh = _scores(q, k, causal, segments)
    ct = scores.dtype
    lse = lse.astype(ct, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        p = xp.exp(scores - xp.where(xp.isfinite(lse), lse, 0)[..., None])
    p = xp.where(xp.isfinite(scores), p, 0)                               # (B, H, Tq, Tk)
    doh = _heads_first(xp, dout, ct)                                      # (B, H, Tq, hs)
    vh = xp.repeat(_heads_first(xp, v, ct), G, axis=1)                    # (B, H, Tk, hs)
    D = (dout.astype(ct, copy=False) * out.astype(ct, copy=False)).sum(axis=-1).transpose(0, 2, 1)  # (B, H, Tq)
    dvh = p.swapaxes(-1, -2) @ doh                                        # (B, H, Tk, hs)
    ds = p * (doh @ vh.swapaxes(-1, -2) - D[..., None])                   # (B, H, Tq, Tk)
    scale = ct.type(1.0 / math.sqrt(hs))
    dqh = (ds @ kh) * scale                                               # (B, H, Tq, hs)
    dkh = (ds.swapaxes(-1, -2) @ qh) * scale                              # (B, H, Tk, hs)

    def kv_grad(x):  # (B, H, Tk, hs) -> (B, Tk, Hkv, hs), summing each kv head's G query heads
        return xp.ascontiguousarray(x.reshape(B, Hkv, G, Tk, hs).sum(axis=2).transpose(0, 2, 1, 3))

    return xp.ascontiguousarray(dqh.transpose(0, 2, 1, 3)), kv_grad(dkh), kv_grad(dvh)


# ---------------------------------------------------------------- the kernel

def kernel_supports(q, k=None) -> bool:
    """Whether flash_attention_forward runs the CUDA kernel for these arrays (not the reference)."""
    return (backend.get_array_module(q) is not np and q.dtype in (backend.bfloat16, np.dtype(np.float16))
            and q.ndim == 4 and q.shape[-1] in HEAD_DIMS and (k is None or k.dtype == q.dtype))


def _kernel_operand(a):
    """a itself when the kernel can address it by strides (last dim contiguous, 16-byte rows), else a copy."""
    item = a.itemsize
    ok = (a.strides[-1] == item and a.data.ptr % 16 == 0
          and all(s % 16 == 0 for s in a.strides[:-1]))
    return a if ok else backend.get_array_module(a).ascontiguousarray(a)


def _set_dynamic_smem(fn, nbytes: int):
    """Raise the kernel's dynamic shared-memory limit above the default 48 KB."""
    try:
        fn.max_dynamic_shared_size_bytes = nbytes         # CuPy's RawKernel
    except AttributeError:
        cuda = backend.cupy_module().cuda
        cuda.driver.funcSetAttribute(fn.ptr, 8, nbytes)   # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


_KERNELS: dict = {}


def _kernel(dtype, hs: int, cfg: KernelConfig, device_id: int):
    """The compiled kernel for (dtype, hs, cfg) on one GPU, cached here: backend.get_kernel re-reads
    and hashes the source on every call, host time that short attention calls cannot hide."""
    key = (np.dtype(dtype), hs, cfg, device_id)
    fn = _KERNELS.get(key)
    if fn is None:
        fn = backend.get_kernel("flash_attn_fwd", "flash_attn_forward", dtype, options=cfg.options(hs), arch=cfg.arch)
        _set_dynamic_smem(fn, cfg.smem_bytes(hs, np.dtype(dtype).itemsize))
        _KERNELS[key] = fn
    return fn


def flash_attention_forward(q, k, v, causal=True, segments=None, config: KernelConfig | None = None):
    """(out (B, Tq, H, hs) in q's dtype, lse (B, H, Tq) float32).

    The CUDA kernel for CuPy bf16/fp16 arrays with hs in HEAD_DIMS; otherwise the fp32 reference,
    its output cast to q's dtype. `config` overrides default_config(hs) (tests, benchmarks).
    """
    B, Tq, Tk, H, Hkv, hs = _check(q, k, v, segments)
    if not kernel_supports(q, k):
        out, lse = attention_forward_reference(q, k, v, causal, segments)
        return out.astype(q.dtype, copy=False), lse
    xp = backend.get_array_module(q)
    out = xp.empty((B, Tq, H, hs), q.dtype)
    lse = xp.empty((B, H, Tq), np.float32)
    if out.size == 0 or Tk == 0:
        out[...] = 0
        lse[...] = -np.inf
        return out, lse
    q, k, v = (_kernel_operand(a) for a in (q, k, v))
    seg = None
    if segments is not None:
        seg = xp.ascontiguousarray(xp.asarray(segments), dtype=np.int32)
    cfg = config or default_config(hs, q.device.id)
    smem = cfg.smem_bytes(hs, q.itemsize)
    e = q.itemsize
    with q.device:
        fn = _kernel(q.dtype, hs, cfg, q.device.id)
        grid = (B * H, -(-Tq // cfg.block_m))
        fn(grid, (32 * cfg.warps,),
           (q, k, v, out, lse, seg if seg is not None else np.uint64(0),
            np.int32(H), np.int32(H // Hkv), np.int32(Tq), np.int32(Tk),
            *(np.int64(s // e) for s in q.strides[:3]),
            *(np.int64(s // e) for s in k.strides[:3]),
            *(np.int64(s // e) for s in v.strides[:3]),
            np.float32(math.log2(math.e) / math.sqrt(hs)), np.int32(bool(causal))),
           shared_mem=smem)
    return out, lse


# ---------------------------------------------------------------- autograd
