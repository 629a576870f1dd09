"""Rotary position embedding on Meta's interleaved pairs (2i, 2i+1): the Function, its reference, the
CPU path and the GPU kernel (kernels/rope.cu). bf16 is rotated in fp32 and rounded once."""
from __future__ import annotations

import numpy as np

from llamac.engine import backend, cpu
from llamac.engine.ops import compute_dtype
from llamac.engine.tensor import Function, Tensor
from llamac.errors import ShapeError
from llamac.ops.common import _cuda_dtype, _launch_config, _on_gpu

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"rope": ("rope_forward", "rope_backward")}

# ---------------------------------------------------------------- RoPE
# Meta's interleaved pairs (2i, 2i+1) of each head rotated by t * freq_i; the backward rotates by
# -angle. x (B, T, H, hs), cos/sin (T, hs/2). Kernel: kernels/rope.cu.

def rope_reference(x, cos, sin, sign=1.0):
    """x rotated pairwise by +angle (sign 1, the forward) or -angle (sign -1, the backward)."""
    xp = backend.get_array_module(x)
    ct = compute_dtype(x.dtype)
    B, T, H, hs = x.shape
    pairs = x.reshape(B, T, H, hs // 2, 2).astype(ct, copy=False)    # (B, T, H, hs/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos.astype(ct, copy=False)[None, :, None, :]                 # (1, T, 1, hs/2)
    s = sin.astype(ct, copy=False)[None, :, None, :] * ct.type(sign)
    out = xp.empty(pairs.shape, ct)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(B, T, H, hs).astype(x.dtype, copy=False)


def _rope(op, x, cos, sin, sign):
    xp = _on_gpu(op, x=x, cos=cos, sin=sin)
    if x.ndim != 4 or x.shape[3] % 2:
        raise ShapeError(f"{op}: x must be (B, T, H, hs) with hs even, got {x.shape}")
    B, T, H, hs = x.shape
    if cos.shape != (T, hs // 2) or sin.shape != (T, hs // 2):
        raise ShapeError(f"{op}: cos {cos.shape} / sin {sin.shape} do not fit x {x.shape} (want {(T, hs // 2)})")
    if xp is np:
        return rope_reference(x, cos, sin, sign)
    dtype = _cuda_dtype(op, x)
    # Read in place when only the positions are strided (q or k inside a packed projection).
    x_row = position_stride(x)
    if x_row is None:
        x = xp.ascontiguousarray(x)
        x_row = H * hs
    # The model's tables are in its own dtype: read them as they are (exact widening), no cast.
    options = ("-DROPE_TABLE_IN_DTYPE",) if cos.dtype == dtype and dtype != np.float32 else ()
    table = dtype if options else np.float32
    cos = xp.ascontiguousarray(cos, dtype=table)
    sin = xp.ascontiguousarray(sin, dtype=table)
    out = xp.empty(x.shape, dtype)
    if x.size:
        with x.device:
            fn = backend.get_kernel("rope", op, dtype, options)
            grid, block = _launch_config(x.size, (x, out))
            fn(grid, block, (x, cos, sin, out, np.int64(x.size), np.int32(T), np.int32(H), np.int32(hs),
                             np.int64(x_row)))
    return out


def position_stride(x):
    """Elements from one position to the next of a (B, T, H, hs) array whose (H, hs) block per
    position is contiguous and whose B*T positions are evenly spaced (a C-contiguous array: H*hs;
    q, k or v of a packed (B, T, (H + 2 Hkv) hs) projection: its width); None for other layouts."""
    B, T, H, hs = x.shape
    item = x.itemsize
    if (hs > 1 and x.strides[3] != item) or (H > 1 and x.strides[2] != hs * item):
        return None
    if T > 1:
        step = x.strides[1]
        if B > 1 and x.strides[0] != T * step:
            return None
    else:
        step = x.strides[0] if B > 1 else H * hs * item
    if step % item or step < H * hs * item:
        return None
    return step // item


def rope_forward(x, cos, sin):
    """x (B, T, H, hs) rotated by angle t * freq_i per pair (2i, 2i+1); cos, sin (T, hs/2).

    CUDA kernel on CuPy arrays (float32/bfloat16/float16 x; fp32 tables, or tables in x's dtype),
    the reference on NumPy arrays. Returns a new array.
    """
    return _rope("rope_forward", x, cos, sin, 1.0)


def rope_backward(dout, cos, sin):
    """The gradient of rope_forward: dout rotated by -angle."""
    return _rope("rope_backward", dout, cos, sin, -1.0)


class RoPE(Function):
    """Rotary embedding on (B, T, H, hs) with Meta's interleaved pairing: dims (2i, 2i+1) rotate
    by angle pos * freq_i. cos/sin are (T, hs/2)."""

    def forward(self, x, cos, sin):
        B, T, H, hs = x.shape
        if cos.shape != (T, hs // 2):
            raise ShapeError(f"rope: cos/sin {cos.shape} do not fit input {x.shape} (want {(T, hs // 2)})")
        self.save(cos, sin)
        if backend.get_array_module(x) is not np and x.dtype in backend.CUDA_TYPES:    # kernels/rope.cu
            return rope_forward(x, cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    def backward(self, g):
        cos, sin = self.saved
        if backend.get_array_module(g) is not np and g.dtype in backend.CUDA_TYPES:
            return rope_backward(g, cos, sin), None, None
        return _rotate(g, cos, sin, sign=-1.0), None, None


def _rotate(x, cos, sin, sign):
    if backend.get_array_module(x) is np and x.dtype in (np.float32, np.float64):
        return rotate_pairs(x, cos, sin, sign)
    return rope_reference(x, cos, sin, sign)


def rope(x: Tensor, cos, sin) -> Tensor:
    cos = cos if isinstance(cos, Tensor) else Tensor(cos)
    sin = sin if isinstance(sin, Tensor) else Tensor(sin)
    return RoPE.apply(x, cos, sin)


# ---------------------------------------------------------------- RoPE

def rotate_pairs(x, cos, sin, sign):
    """Each pair (x_2i, x_2i+1) as one complex number times e^(i sign angle): a single complex
    multiply per pair (Meta's reference does the same with view_as_complex), batch rows split
    over the cores."""
    B, T, H, hs = x.shape
    ctype = np.complex64 if x.dtype == np.float32 else np.complex128
    xc = np.ascontiguousarray(x).view(ctype)                            # (B, T, H, hs/2)
    rot = np.empty(cos.shape, ctype)                                    # (T, hs/2)
    rot.real, rot.imag = cos, sin if sign > 0 else -sin
    rot = rot[:, None, :]                                               # (T, 1, hs/2)
    out = np.empty(xc.shape, ctype)
    cpu.for_row_blocks(lambda a, b: np.multiply(xc[a:b], rot, out=out[a:b]), B, x.size)
    return out.view(x.dtype)
