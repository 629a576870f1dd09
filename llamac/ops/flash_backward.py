"""Flash-attention backward: the tensor-core kernel (kernels/flash_attn_bwd.cu) beside its references.

Semantics shared with the forward (llamac.ops.flash_forward): q (B, Tq, H, hs); k, v (B, Tk, Hkv, hs)
with H % Hkv == 0 (query head h reads kv head h // (H // Hkv)); query i sits at absolute
position Tk - Tq + i; key j is visible to it iff (not causal or j <= i + Tk - Tq) and
(segments is None or segments[b, j] == segments[b, i + Tk - Tq]); scale = 1 / sqrt(hs).
The forward returns out (B, Tq, H, hs) and lse (B, H, Tq), the natural-log logsumexp of
the scaled, masked scores, which is all the backward needs to rebuild the probabilities
block by block: nothing Tq x Tk is ever held.

The references are llamac.ops.flash_forward's. Nothing here imports cupy (llamac.engine.backend hands it out)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llamac.engine import backend
from llamac.errors import DeviceError, LlamacError, ShapeError
from llamac.ops.flash_forward import HEAD_DIMS, _check_shapes, _set_dynamic_smem, attention_backward_reference
from llamac.ops.rope import position_stride, rope_reference

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"flash_attn_bwd": ("flash_attn_bwd_preprocess", "flash_attn_bwd", "flash_attn_bwd_convert_dq")}

KERNEL = "flash_attn_bwd"


@dataclass(frozen=True)
class Tiles:
    """Compile-time tiles of the main kernel (kernels/flash_attn_bwd.cu's BLOCK_Q, NWARPS, KEY_TILES)."""
    block_q: int         # queries per tile
    warps: int           # warps per CTA
    key_tiles: int       # 16-key row tiles per warp: a CTA's key block is 16 * warps * key_tiles keys
    wgmma: bool = False  # Hopper warpgroup MMA for the five products (-DLLAMAC_WGMMA; an sm_90a build)

    @classmethod
    def of(cls, tiles) -> "Tiles":
        """tiles itself, or the Tiles of a (block_q, warps, key_tiles[, wgmma]) tuple."""
        if isinstance(tiles, cls):
            return tiles
        if not isinstance(tiles, (tuple, list)) or len(tiles) not in (3, 4):
            raise LlamacError(f"flash attention backward: tiles must be Tiles or (block_q, warps, key_tiles[, wgmma]), "
                              f"got {tiles!r}")
        return cls(*tiles)

    @property
    def block_k(self) -> int:
        return 16 * self.warps * self.key_tiles

    @property
    def arch(self) -> str | None:
        """The build target when it must be named: wgmma exists only for sm_90a (H100/H200)."""
        return "sm_90a" if self.wgmma else None

    def options(self) -> tuple:
        """The main kernel's tile -D flags (after -DHEAD_DIM and the RoPE table's)."""
        return (f"-DBLOCK_Q={self.block_q}", f"-DNWARPS={self.warps}", f"-DKEY_TILES={self.key_tiles}") + \
            (("-DLLAMAC_WGMMA",) if self.wgmma else ())


# Per head_dim, the fastest variant, chosen by timing every one with llamac.bench.flash.bench_flash_backward
# (numbers, devices and dates in BENCHMARKS.md). Two row tiles per warp reuse each Q/dO fragment twice,
# but need 255 registers at hs=64 and spill at hs=128 (the dK/dV accumulators alone would be 256 registers).
TILES = {64: Tiles(block_q=32, warps=4, key_tiles=2), 128: Tiles(block_q=64, warps=8, key_tiles=1)}
# hs 32 and 48 take hs=64's tiles, hs=96 hs=128's (key_tiles 2 spills there too).
TILES.update({32: TILES[64], 48: TILES[64], 96: TILES[128]})
# With few keys a 64-key CTA (key_tiles 1) beats a 128-key one: twice the CTAs for the SMs and
# less of the causal diagonal wasted. Measured at hs=48 only, so only hs=48 switches.
SHORT_TK = 512
SHORT_TILES = {48: Tiles(block_q=32, warps=4, key_tiles=1)}
VARIANTS = (Tiles(block_q=32, warps=4, key_tiles=1), Tiles(block_q=64, warps=4, key_tiles=1),
            Tiles(block_q=32, warps=8, key_tiles=1), Tiles(block_q=64, warps=8, key_tiles=1),
            Tiles(block_q=32, warps=4, key_tiles=2), Tiles(block_q=32, warps=8, key_tiles=2))
# Hopper (compute capability 9.0; an sm_90a build): wgmma=True runs the five products on warpgroup
# MMA (-DLLAMAC_WGMMA: hs 64, FlashAttention-3's 128 keys x 128 queries, two warpgroups, dQ reduced
# once per 128 keys through bulk adds from shared memory). The default there (HOPPER_TILES): 128
# queries a tile halve the dQ reductions and query-tile loads per key, the L2 traffic that bounds
# this kernel, against a 64-query design (numbers in BENCHMARKS.md).
HOPPER_VARIANTS = (Tiles(block_q=128, warps=8, key_tiles=1, wgmma=True),)
HOPPER_TILES = {64: HOPPER_VARIANTS[0]}


def default_tiles(hs: int, Tk: int, capability: str | None = None) -> Tiles:
    """The tiles flash_attention_backward uses without `tiles=`: HOPPER_TILES[hs] on compute
    capability "90" (backend.compute_capability()), else TILES[hs], or SHORT_TILES[hs] for Tk <= SHORT_TK."""
    if capability == "90" and hs in HOPPER_TILES:
        return HOPPER_TILES[hs]
    return SHORT_TILES[hs] if Tk <= SHORT_TK and hs in SHORT_TILES else TILES[hs]


def tiles_fit(hs: int, tiles) -> bool:
    """Whether the kernel builds for head size hs with `tiles`: the dQ tile (block_q x hs) splits
    over the warps as 16-row tiles times column blocks that are a multiple of 8 wide (hs=48 with
    8 warps and 32 queries would leave 12 columns a warp)."""
    t = Tiles.of(tiles)
    if t.wgmma and (hs != 64 or t.block_q != 128 or t.warps != 8 or t.key_tiles != 1):
        return False
    row_tiles = t.block_q // 16
    if t.warps % row_tiles:
        return False
    col_split = t.warps // row_tiles
    return hs % col_split == 0 and (hs // col_split) % 8 == 0


def variants(hs: int) -> tuple:
    """The VARIANTS (and HOPPER_VARIANTS) the kernel builds for head size hs."""
    return tuple(t for t in VARIANTS + HOPPER_VARIANTS if tiles_fit(hs, t))


# ---------------------------------------------------------------- the kernel

def _check_operands(q, k, v, out, dout, lse, segments):
    op = "flash_attention_backward"
    arrays = {"q": q, "k": k, "v": v, "out": out, "dout": dout, "lse": lse}
    modules = set()
    for name, a in arrays.items():
        xp = backend.get_array_module(a)
        if not isinstance(a, xp.ndarray):
            raise LlamacError(f"{op}: {name} must be a NumPy or CuPy array, not {type(a).__name__}")
        modules.add(xp)
    if segments is not None:
        modules.add(backend.get_array_module(segments))
    if len(modules) > 1:
        raise DeviceError(f"{op}: operands must all be on one device (cpu and cuda mixed)")
    _check_shapes(op, q, k, v, segments)
    B, Tq, H, hs = q.shape
    for name, a in (("out", out), ("dout", dout)):
        if a.shape != q.shape:
            raise ShapeError(f"{op}: {name} has shape {a.shape} but q has {q.shape}; shapes must match")
    if lse.shape != (B, H, Tq):
        raise ShapeError(f"{op}: lse has shape {lse.shape}, expected (B, H, Tq) = {(B, H, Tq)}")
    for name, a in (("k", k), ("v", v), ("out", out), ("dout", dout)):
        if a.dtype != q.dtype:
            raise LlamacError(f"{op}: {name} is {a.dtype} but q is {q.dtype}; dtypes must match")
    if segments is not None and np.dtype(segments.dtype).kind not in "iu":
        raise LlamacError(f"{op}: segments must hold integer document ids, got {segments.dtype}")
    xp = modules.pop()
    if xp is np:
        if not backend.is_float(q.dtype):
            raise LlamacError(f"{op}: needs floating-point arrays, got {q.dtype}")
        return xp
    if q.dtype not in (backend.bfloat16, np.dtype(np.float16)):
        raise LlamacError(f"{op}: the CUDA kernel takes bfloat16 or float16, got {q.dtype}")
    if hs not in HEAD_DIMS:
        raise LlamacError(f"{op}: the CUDA kernel takes head_dim {' or '.join(map(str, HEAD_DIMS))}, got {hs}")
    for name, a in arrays.items():
        # The kernel indexes flat memory and loads 16 bytes at a time; v may be the v part of a
        # packed q|k|v projection (evenly spaced positions, 16-byte aligned).
        if name == "v" and not a.flags.c_contiguous:
            step = position_stride(a)
            if step is None or step * a.itemsize % 16:
                raise LlamacError(f"{op}: v must be C-contiguous or have contiguous, evenly spaced, "
                                  "16-byte aligned positions; pass xp.ascontiguousarray(v)")
        elif not a.flags.c_contiguous:
            raise LlamacError(f"{op}: {name} is not C-contiguous; pass xp.ascontiguousarray({name})")
        if a.data.ptr % 16:
            raise LlamacError(f"{op}: {name} does not start on a 16-byte boundary; pass a copy")
    devices = {a.device.id for a in arrays.values()}
    if len(devices) > 1:
        raise DeviceError(f"{op}: operands are on different GPUs")
    return xp


def _check_rope(q, k, rope):
    B, Tq, H, hs = q.shape
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise LlamacError("flash_attention_backward: rope must be a (cos, sin) pair of tables")
    if k.shape[1] != Tq:
        raise ShapeError(f"flash_attention_backward: RoPE folded in needs Tq == Tk, got {Tq} and {k.shape[1]}")
    for name, t in zip(("cos", "sin"), rope):
        if t.shape != (Tq, hs // 2):
            raise ShapeError(f"flash_attention_backward: rope {name} is {t.shape}, "
                             f"expected (T, hs/2) = {(Tq, hs // 2)}")
        if backend.get_array_module(t) is not backend.get_array_module(q):
            raise DeviceError(f"flash_attention_backward: rope {name} is not on q's device")


def _check_grads_out(q, k, v, grads_out):
    """(dq_row, dkv_row): the position strides of the destination arrays, after checking them."""
    op = "flash_attention_backward"
    if not isinstance(grads_out, (tuple, list)) or len(grads_out) != 3:
        raise LlamacError(f"{op}: grads_out must be a (dq, dk, dv) triple of arrays")
    xp = backend.get_array_module(q)
    strides = []
    for name, dst, like in zip(("dq", "dk", "dv"), grads_out, (q, k, v)):
        if backend.get_array_module(dst) is not xp or dst.shape != like.shape or dst.dtype != q.dtype:
            raise LlamacError(f"{op}: grads_out {name} must be a {q.dtype} array of shape {like.shape} "
                              f"on q's device, got {getattr(dst, 'shape', None)} {getattr(dst, 'dtype', None)}")
        step = position_stride(dst)
        # The dq conversion stores 16 bytes at a time: 16-byte aligned rows.
        if step is None or (xp is not np and (dst.data.ptr % 16 or step * dst.itemsize % 16)):
            raise LlamacError(f"{op}: grads_out {name} must be C-contiguous or a view with contiguous, "
                              "evenly spaced, 16-byte aligned positions")
        strides.append(step)
    if strides[1] != strides[2]:
        raise LlamacError(f"{op}: grads_out dk and dv must space their positions alike "
                          f"({strides[1]} and {strides[2]} elements)")
    return strides[0], strides[1]


def shared_bytes(head_dim: int, tiles) -> int:
    """Dynamic shared memory of one CTA of the main kernel with `tiles` (the layout in flash_attn_bwd.cu)."""
    t = Tiles.of(tiles)
    block_q, block_k, wgmma = t.block_q, t.block_k, t.wgmma
    pad = 0 if wgmma else 8                                 # wgmma's swizzled rows are unpadded
    lds = head_dim + pad
    kv_q = (2 * block_k + 2 * 2 * block_q) * lds * 2       # K, V, and two stages of Q, dO, as 16-bit
    ds = block_k * (block_q + pad) * 2                      # dS^T
    dq = block_q * (head_dim + 8) * 4 if wgmma else 0       # fp32 dQ staged for the bulk adds
    return kv_q + ds + 2 * 3 * block_q * 4 + block_k * 4 + dq   # two stages of lse, D, query ids; key ids


def flash_attention_backward(q, k, v, out, dout, lse, causal=True, segments=None, *, tiles=None, rope=None,
                             grads_out=None):
    """(dq, dk, dv) of attention: the tensor-core kernel on CuPy bf16/fp16 arrays, the reference on NumPy.

    q, out, dout (B, Tq, H, hs); k, v (B, Tk, Hkv, hs); lse (B, H, Tq) fp32 from the forward;
    segments (B, Tk) integer document ids or None. dq comes back like q, dk and dv like k
    (each kv head's gradient summed over its G query heads), all in q's dtype, computed with
    fp32 accumulation. head_dim in HEAD_DIMS on the GPU. `tiles`, a Tiles (or a (block_q, warps,
    key_tiles[, wgmma]) tuple) of variants(hs), overrides default_tiles(hs, Tk, <the GPU's capability>),
    for benchmarks and tests.

    rope=(cos, sin), tables (T, hs/2) with Tq = Tk = T: q and k are RoPE's outputs (Meta's
    interleaved pairs, kernels.rope_forward), and dq, dk come back as the gradients of its inputs:
    RoPE's backward folded into the kernels' stores (the reference: kernels.rope_backward after).

    grads_out=(dq, dk, dv): arrays of q's dtype shaped like q, k, v to write the gradients into,
    C-contiguous or views whose positions are evenly spaced (kernels.position_stride; dk and dv
    spaced alike): the q, k and v parts of one packed (B, T, (H + 2 Hkv) hs) gradient. Returned.
    """
    xp = _check_operands(q, k, v, out, dout, lse, segments)
    if rope is not None:
        _check_rope(q, k, rope)
    out_strides = _check_grads_out(q, k, v, grads_out) if grads_out is not None else None
    if xp is np:
        grads = attention_backward_reference(q, k, v, out, dout, lse, causal, segments)
        if rope is not None:
            grads = (*(rope_reference(g, rope[0], rope[1], -1.0) for g in grads[:2]), grads[2])
        if grads_out is None:
            return tuple(g.astype(q.dtype, copy=False) for g in grads)
        for dst, g in zip(grads_out, grads):
            dst[...] = g
        return tuple(grads_out)

    B, Tq, H, hs = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if grads_out is None:
        dq = xp.empty_like(q)
        dk, dv = xp.empty_like(k), xp.empty_like(v)
        dq_row, dkv_row = H * hs, Hkv * hs
    else:
        (dq, dk, dv), (dq_row, dkv_row) = grads_out, out_strides
    if B == 0 or Tq == 0 or H == 0:
        dk[...] = 0
        dv[...] = 0
        return dq, dk, dv
    tiles = Tiles.of(tiles) if tiles else default_tiles(hs, Tk, backend.compute_capability(q.device.id))
    if tiles not in VARIANTS + HOPPER_VARIANTS or not tiles_fit(hs, tiles):
        raise LlamacError(f"flash_attention_backward: tiles for head_dim {hs} must be one of {variants(hs)}, got {tiles}")
    # The preprocess and the dQ conversion depend on the head size (and the table type) alone: every
    # tile variant shares one build of them, for plain sm_90 even when the main kernel is wgmma's.
    options = (f"-DHEAD_DIM={hs}",)
    cos = sin = np.uint64(0)                    # null: no RoPE folded in
    if rope is not None:
        # The model's own 16-bit tables are read as they are (exact widening), as kernels/rope.cu does.
        in_dtype = rope[0].dtype == q.dtype and rope[1].dtype == q.dtype
        options += ("-DROPE_TABLE_IN_DTYPE",) if in_dtype else ()
        cos, sin = (xp.ascontiguousarray(t, dtype=q.dtype if in_dtype else np.float32) for t in rope)
    with q.device:
        lse = xp.ascontiguousarray(lse, dtype=np.float32)
        seg = None if segments is None else xp.ascontiguousarray(segments, dtype=np.int32)
        Dsum = xp.empty((B, H, Tq), np.float32)
        dq_acc = xp.empty(q.shape, np.float32)
        rows = B * Tq * H
        pre = backend.get_kernel(KERNEL, "flash_attn_bwd_preprocess", q.dtype, options)
        per_row = 4 if hs <= 32 else 8 if hs <= 64 else 16      # PRE_RT in the kernel
        pre((-(-rows * per_row // 256),), (256,),
            (out, dout, Dsum, dq_acc, np.int32(B), np.int32(Tq), np.int32(H)))

        main = backend.get_kernel(KERNEL, "flash_attn_bwd", q.dtype, options + tiles.options(), arch=tiles.arch)
        smem = shared_bytes(hs, tiles)
        if smem > 48 * 1024:  # above the default, the launch fails unless the kernel opts in
            _set_dynamic_smem(main, smem)
        grid = (B * Hkv, -(-Tk // tiles.block_k))     # key blocks slowest: longest first
        main(grid, (32 * tiles.warps,),
             (q, k, v, dout, lse, Dsum, seg if seg is not None else np.uint64(0), dq_acc, dk, dv,
              np.int32(Tq), np.int32(Tk), np.int32(H), np.int32(Hkv), np.int32(bool(causal)),
              np.float32(1.0 / math.sqrt(hs)), cos, sin, np.int64(dkv_row), np.int64(position_stride(v))),
             shared_mem=smem)

        conv = backend.get_kernel(KERNEL, "flash_attn_bwd_convert_dq", q.dtype, options)
        n = q.size
        conv((max(1, min(-(-n // (256 * 8)), 132 * 16)),), (256,),
             (dq_acc, dq, np.int64(n), cos, sin, np.int32(Tq), np.int32(H), np.int64(dq_row)))
    return dq, dk, dv


# ---------------------------------------------------------------- benchmark

def backward_flops(B: int, H: int, Tq: int, Tk: int, hs: int, causal: bool = True) -> float:
    """Matmul FLOPs of the backward: 2.5 x the forward's 4 B H Tq Tk hs (halved when causal, Tq = Tk)."""
    fwd = 4.0 * B * H * Tq * Tk * hs
    return 2.5 * (fwd / 2 if causal else fwd)
