"""The fused neural-network ops, one module each: its autograd Function(s), its one NumPy reference,
its CPU fast path, its GPU launcher(s), the names of its kernels/*.cu sources (SOURCES) and its
tuning table. Each module chooses between GPU kernel, CPU path and reference in one place.

    linear          projections (one input, several weights; input gradients summed in the GEMM)
    embedding       token embedding (deterministic sorted backward kernel)
    rmsnorm         RMSNorm, and the residual add fused into the norm after it
    rope            rotary position embedding (interleaved pairs)
    swiglu          silu(gate) * up, and its product with the down projection
    cross_entropy   the loss, and the LM head + loss in row chunks
    attention       attention with masks, GQA and documents; the packed q|k|v path with RoPE folded in
    flash_forward   the tensor-core flash forward kernel
    flash_backward  the tensor-core flash backward kernel

Two kernel families live with their only users instead: the multi-tensor AdamW (llamac.train.optim,
beside AdamW's xp path) and the decode step's fused GEMV, attention and sampling kernels
(llamac.infer.decode, beside FastDecoder and their references).
"""
