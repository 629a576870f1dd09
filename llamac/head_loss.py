"""The LM head and its cross-entropy in one Function: logits only ever exist a row chunk at a time.

The plain path keeps a (B*T, V) logits array from the forward until the backward has read its
gradient: 2.1 GB in bf16 for 32k rows of a 32k vocabulary, the largest array of a training step.
Here the forward walks the rows in chunks: logits of the chunk (one GEMM), its loss and
log-sum-exp (kernels/cross_entropy.cu), the logits' gradient written over them, then the chunk's
input gradient (dX = dlogits @ W) and its share of the weight gradient (dW += dlogits.T @ X, summed
in fp32 across chunks) before the next chunk reuses the buffer. The gradients are made in the
forward (the loss is the graph's end, so the gradient reaching it is a scalar known to scale them);
the backward only multiplies by that scalar. Same FLOPs as the plain path, one chunk of logits in
memory instead of all of them.

Written once with `xp`: on the CPU (NumPy) the same chunks run through the reference cross-entropy,
which is what the tests compare with the plain Linear + CrossEntropy in float64.
"""
from __future__ import annotations

import numpy as np

from llamac import backend, kernels
from llamac.engine import Function, Tensor, grad_enabled
from llamac.errors import ShapeError
from llamac.ops import matmul

# Logits per chunk: two chunks for 32k rows x 32k vocabulary in bf16 (half the plain path's 2.1 GB).
# Every chunk after the first re-reads and re-writes the fp32 weight-gradient sum (V x C x 8 bytes):
# at 256 MB chunks (eight) that cost 1.5-2 ms a step at 110M/350M on the H100; at 1 GB, ~0.3 ms.
CHUNK_BYTES = 1 << 30


def chunk_rows(V: int, itemsize: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: at least 128 (a GEMM that still fills the tensor cores)."""
    return max(128, (chunk_bytes or CHUNK_BYTES) // max(1, V * itemsize))


class HeadLoss(Function):
    """mean over valid rows of cross_entropy(x @ w.T, targets); x (..., C), w (V, C), targets (...)."""

    def forward(self, x, w, targets, ignore_index=-100, need_x=True, need_w=True, chunk_bytes=None):
        if x.shape[-1] != w.shape[1] or x.shape[:-1] != targets.shape:
            raise ShapeError(f"head_loss: input {x.shape}, weight {w.shape} and targets {targets.shape} do not fit")
        xp = backend.get_array_module(x)
        C, V = w.shape[1], w.shape[0]
        x2 = x.reshape(-1, C)                                           # (N, C)
        t = targets.reshape(-1)
        N = x2.shape[0]
        ct = np.float64 if x.dtype == np.float64 else np.float32       # the loss's precision
        count = xp.maximum((t != ignore_index).sum(), 1).astype(ct)
        scale = (1 / count).astype(ct)                                  # on the device: no sync
        losses = xp.empty(N, ct)
        dx = xp.empty_like(x2) if need_x else None
        # The weight gradient's fp32 sum over chunks (cuBLAS writes fp32 from bf16 inputs).
        dw = xp.zeros(w.shape, np.float32 if w.dtype.itemsize <= 4 else w.dtype) if need_w else None
        rows = chunk_rows(V, x.dtype.itemsize, chunk_bytes)
        buf = xp.empty((min(rows, N), V), x.dtype)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            logits = buf[:b - a]                                        # (rows, V)
            matmul(x2[a:b], w.T, out=logits)
            loss, lse = kernels.cross_entropy_forward(logits, t[a:b], ignore_index)
            losses[a:b] = loss
            if need_x or need_w:
                grad = kernels.cross_entropy_backward(logits, t[a:b], lse, scale, ignore_index, out=logits)
                if need_x:
                    matmul(grad, w, out=dx[a:b])
                if need_w:
                    matmul(grad.T, x2[a:b], out=dw, beta=1.0)
        self.save(dx, dw)
        self.x_shape, self.w_dtype = x.shape, w.dtype
        return losses.sum() / count

    def backward(self, g):
        dx, dw = self.saved
        self.saved = ()
        g = backend.get_array_module(dx if dx is not None else dw).asarray(g)
        scale = not self.unit_grad                        # loss.backward() itself: g is exactly 1
        gx = gw = None
        if dx is not None:
            if scale:
                dx *= g.astype(dx.dtype)
            gx = dx.reshape(self.x_shape)
        if dw is not None:
            gw = dw.astype(self.w_dtype, copy=False)      # the narrow copy is the one scaled
            if scale:
                gw *= g.astype(gw.dtype)
        return gx, gw, None


def head_loss(x: Tensor, weight: Tensor, targets, ignore_index: int = -100, chunk_bytes: int | None = None) -> Tensor:
    """The loss of linear(x, weight) under cross-entropy, without the whole logits array (HeadLoss)."""
    targets = targets if isinstance(targets, Tensor) else Tensor(targets)
    on = grad_enabled()
    return HeadLoss.apply(x, weight, targets, ignore_index=ignore_index, need_x=on and x.requires_grad,
                          need_w=on and weight.requires_grad, chunk_bytes=chunk_bytes)
