// SwiGLU backward that also recomputes the forward output h = silu(gate) * up, for the MLP's down
// projection (llamac.fused.SwiGLUDown): the step then never keeps h (B*T*hidden values per layer)
// from the forward to the backward; the down projection's weight gradient reads the recomputed h.
// Costs one extra write per element against a full swiglu_forward pass (two reads, one write).
// Formulas as kernels/swiglu.cu (same expressions: h is bit-identical to the forward's).
// NumPy reference and launcher: llamac/kernels.py (swiglu_backward_recompute).

LLAMAC_DEVICE float swr_fwd(float g, float u) {
    return g * sigmoidf_safe(g) * u;
}

LLAMAC_DEVICE void swr_bwd(float g, float u, float d, float& dg, float& du) {
    float s = sigmoidf_safe(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

extern "C" __global__ void swiglu_backward_recompute(const DTYPE* __restrict__ gate,
                                                     const DTYPE* __restrict__ up,
                                                     const DTYPE* __restrict__ dout,
                                                     DTYPE* __restrict__ dgate,
                                                     DTYPE* __restrict__ dup,
                                                     DTYPE* __restrict__ h,
                                                     long long n) {
    const long long tid = global_thread_id();
    const long long stride = grid_stride();
    long long done = 0;

    if (is_aligned16(gate) && is_aligned16(up) && is_aligned16(dout) &&
        is_aligned16(dgate) && is_aligned16(dup) && is_aligned16(h)) {
        constexpr int V = Packed128<DTYPE>::size;
        const long long packs = n / V;
        for (long long p = tid; p < packs; p += stride) {
            const Packed128<DTYPE> g = load128(gate + p * V);
            const Packed128<DTYPE> u = load128(up + p * V);
            const Packed128<DTYPE> d = load128(dout + p * V);
            Packed128<DTYPE> dg, du, o;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float a, b;
                const float gf = to_float(g.v[k]), uf = to_float(u.v[k]);
                swr_bwd(gf, uf, to_float(d.v[k]), a, b);
                dg.v[k] = from_float<DTYPE>(a);
                du.v[k] = from_float<DTYPE>(b);
                o.v[k] = from_float<DTYPE>(swr_fwd(gf, uf));
            }
            store128(dgate + p * V, dg);
            store128(dup + p * V, du);
            store128(h + p * V, o);
        }
        done = packs * V;
    }

    for (long long i = done + tid; i < n; i += stride) {
        float a, b;
        const float gf = load_f(gate + i), uf = load_f(up + i);
        swr_bwd(gf, uf, load_f(dout + i), a, b);
        store_f(dgate + i, a);
        store_f(dup + i, b);
        store_f(h + i, swr_fwd(gf, uf));
    }
}
