"""The training step's fusions, applied to a pure Llama from outside (as torch.compile would be).

`fuse(model)` swaps the model's modules for drop-in subclasses with the same parameters (so the
state dict, checkpoints and exports are unchanged) whose forward takes the fused ops:

- projections of one input (q | k | v, gate | up) sum their input gradients inside the GEMMs;
- on the GPU (runtime.options().packed_qkv): q | k | v from one GEMM against wq | wk | wv laid out
  as row blocks of one array, RoPE's backward folded into the flash backward;
- the down projection multiplies SwiGLU's product it may recompute in its backward;
- on the GPU (fuse_residuals): every residual add inside the RMSNorm after it;
- train.recompute: only each layer's input kept, the rest recomputed in the backward;
- on the GPU with gradients on (fused_head_loss): the LM head and its loss in row chunks, so the
  forward returns no logits; else the loss's backward may overwrite the logits (overwrite_logits).

Each fused op still chooses its own kernel or CPU path (llamac.ops); on the CPU the residual, head
and packed fusions fall back to the plain path by themselves.
"""
from __future__ import annotations

import numpy as np

from llamac import runtime
from llamac.engine import backend, cublas, functional
from llamac.engine.tensor import Tensor, grad_enabled
from llamac.model.llama import Attention, FeedForward, Llama
from llamac.ops import attention, linear, rmsnorm, swiglu
from llamac.ops.cross_entropy import CrossEntropy, head_loss


def _bias_free(*modules) -> bool:
    return all(m.bias is None for m in modules)


class FusedAttention(Attention):
    def after_move(self):
        """On the GPU, wq | wk | wv become row blocks of one array, so the packed attention's
        stacked weight is that array itself: no per-step concatenation. The optimizer updates the
        views in place."""
        weights = [m.weight for m in (self.wq, self.wk, self.wv)]
        xp = backend.get_array_module(weights[0].data)
        if xp is np or not _bias_free(self.wq, self.wk, self.wv):
            return
        stacked = xp.concatenate([w.data for w in weights], axis=0)    # ((H + 2 Hkv) hs, C)
        start = 0
        for w in weights:
            w.data = stacked[start: start + w.shape[0]]
            start += w.shape[0]

    def project(self, x):
        if not _bias_free(self.wq, self.wk, self.wv):
            return super().project(x)
        return linear.linears(x, [self.wq.weight, self.wk.weight, self.wv.weight])

    def forward(self, x, cos, sin, mask: dict, cache=None, layer=0):
        if cache is None and "bias" not in mask and _bias_free(self.wq, self.wk, self.wv) \
                and attention.use_packed_attention(x, self.head_dim):
            B, T, _ = x.shape
            y = attention.packed_attention(x, [self.wq.weight, self.wk.weight, self.wv.weight], cos, sin,
                                           self.n_heads, self.n_kv_heads, mask.get("segments"),
                                           mask.get("causal", True))   # (B, T, H, hs)
            return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))
        return super().forward(x, cos, sin, mask, cache, layer)


class FusedFeedForward(FeedForward):
    def forward(self, x):
        if not _bias_free(self.w1, self.w3):
            return super().forward(x)
        gate, up = linear.linears(x, [self.w1.weight, self.w3.weight])
        if self.w2.bias is None:
            return swiglu.swiglu_down(gate, up, self.w2.weight)
        return self.w2(swiglu.swiglu(gate, up))


class FusedLlama(Llama):
    recompute = False

    def run_layers(self, x, cos, sin, mask: dict, cache=None):
        if self.recompute and self.training and grad_enabled() and cache is None:
            for i, layer in enumerate(self.layers):   # only each layer's input kept for the backward
                x = functional.recompute(lambda t, layer=layer, i=i: layer(t, cos, sin, mask, None, i),
                                         x, layer.parameters())
            return self.norm(x)
        if self._fuse_residuals(x):
            return self._fused_layers(x, cos, sin, mask, cache)
        return super().run_layers(x, cos, sin, mask, cache)

    def _fuse_residuals(self, x) -> bool:
        """GPU without active dropout: each residual add runs in one kernel with the RMSNorm after it."""
        return runtime.options().fuse_residuals and rmsnorm.use_fused_residual(x, self.norm.weight) and not any(
            layer.dropout and layer.training for layer in self.layers)

    def _fused_layers(self, x, cos, sin, mask, cache):
        """x + attention -> ffn_norm, x + feed-forward -> the next layer's attention_norm (the final
        norm after the last), each pair one kernel."""
        n = self.layers[0].attention_norm(x)
        for i, layer in enumerate(self.layers):
            h = layer.attention(n, cos, sin, mask, cache, i)
            x, n = rmsnorm.add_rms_norm(x, h, layer.ffn_norm.weight, layer.ffn_norm.eps)
            h = layer.feed_forward(n)
            following = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            x, n = rmsnorm.add_rms_norm(x, h, following.weight, following.eps)
        return n

    def head(self, x, weight, targets=None):
        if targets is not None and self._head_loss(x, weight):
            # The logits exist one row chunk at a time inside the loss: there are none to return.
            return None, head_loss(x, weight, targets, ignore_index=-100)
        if targets is None:
            return super().head(x, weight)
        logits = linear.linear(x, weight)                               # (B, T, V)
        targets = targets if isinstance(targets, Tensor) else Tensor(targets)
        # On the GPU the loss's backward writes the logits' gradient over the logits (the largest
        # activation of a step): read `logits` before calling backward.
        overwrite = logits.xp is not np and logits.requires_grad and runtime.options().overwrite_logits
        return logits, CrossEntropy.apply(logits, targets, ignore_index=-100, overwrite_logits=overwrite)

    def _head_loss(self, x, head) -> bool:
        return (runtime.options().fused_head_loss and x.xp is not np and grad_enabled()
                and (x.requires_grad or head.requires_grad) and cublas.gemm_supported(x.dtype)
                and x.dtype == head.dtype)


def fuse(model: Llama, recompute: bool | None = None) -> Llama:
    """Swap model's modules for their fused subclasses, in place (the same parameters); returns model."""
    if not isinstance(model, FusedLlama):
        model.__class__ = FusedLlama
        for layer in model.layers:
            layer.attention.__class__ = FusedAttention
            layer.feed_forward.__class__ = FusedFeedForward
            layer.attention.after_move()
    if recompute is not None:
        model.recompute = recompute
    return model
