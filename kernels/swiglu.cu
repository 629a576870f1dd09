// SwiGLU, the Llama MLP gate: out = silu(gate) * up, silu(x) = x * sigmoid(x); its backward, and
// the backward that recomputes out (below). NumPy references and launchers: llamac/ops/swiglu.py.
//
// Memory-bound, so each thread moves 16 bytes per operand when every pointer
// is 16-byte aligned (the usual case: CuPy allocations are 256-byte aligned),
// and one element at a time otherwise. Either way a grid-stride loop covers
// any n with any grid, and the elements past the last full 16-byte pack are
// done by the scalar loop.

LLAMAC_DEVICE float swiglu_fwd(float g, float u) {
    return g * sigmoidf_safe(g) * u;
}

// d/dg [g * sig(g)] = sig(g) + g * sig(g) * (1 - sig(g)) = sig * (1 + g * (1 - sig)).
LLAMAC_DEVICE void swiglu_bwd(float g, float u, float d, float& dg, float& du) {
    float s = sigmoidf_safe(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

extern "C" __global__ void swiglu_forward(const DTYPE* __restrict__ gate,
                                          const DTYPE* __restrict__ up,
                                          DTYPE* __restrict__ out,
                                          long long n) {
    const long long tid = global_thread_id();
    const long long stride = grid_stride();
    long long done = 0;

    // Same answer in every thread, so the branch never diverges.
    if (is_aligned16(gate) && is_aligned16(up) && is_aligned16(out)) {
        constexpr int V = Packed128<DTYPE>::size;
        const long long packs = n / V;
        for (long long p = tid; p < packs; p += stride) {
            const Packed128<DTYPE> g = load128(gate + p * V);
            const Packed128<DTYPE> u = load128(up + p * V);
            Packed128<DTYPE> o;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                o.v[k] = from_float<DTYPE>(swiglu_fwd(to_float(g.v[k]), to_float(u.v[k])));
            }
            store128(out + p * V, o);
        }
        done = packs * V;
    }

    for (long long i = done + tid; i < n; i += stride) {
        store_f(out + i, swiglu_fwd(load_f(gate + i), load_f(up + i)));
    }
}

// The backward, and (RECOMPUTE) the same pass writing the forward output h = silu(gate) * up too,
// for the MLP's down projection (llamac.ops.swiglu.SwiGLUDown): the step then never keeps h (B*T*hidden
// values per layer) from the forward to the backward; the down projection's weight gradient reads
// the recomputed h. One extra write per element against a full swiglu_forward pass (two reads, one
// write); h is bit-identical to swiglu_forward's (the same swiglu_fwd).
template <bool RECOMPUTE>
LLAMAC_DEVICE void swiglu_backward_pass(const DTYPE* __restrict__ gate, const DTYPE* __restrict__ up,
                                        const DTYPE* __restrict__ dout, DTYPE* __restrict__ dgate,
                                        DTYPE* __restrict__ dup, DTYPE* __restrict__ h, long long n) {
    const long long tid = global_thread_id();
    const long long stride = grid_stride();
    long long done = 0;

    if (is_aligned16(gate) && is_aligned16(up) && is_aligned16(dout) &&
        is_aligned16(dgate) && is_aligned16(dup) && (!RECOMPUTE || is_aligned16(h))) {
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
                swiglu_bwd(gf, uf, to_float(d.v[k]), a, b);
                dg.v[k] = from_float<DTYPE>(a);
                du.v[k] = from_float<DTYPE>(b);
                if constexpr (RECOMPUTE) o.v[k] = from_float<DTYPE>(swiglu_fwd(gf, uf));
            }
            store128(dgate + p * V, dg);
            store128(dup + p * V, du);
            if constexpr (RECOMPUTE) store128(h + p * V, o);
        }
        done = packs * V;
    }

    for (long long i = done + tid; i < n; i += stride) {
        float a, b;
        const float gf = load_f(gate + i), uf = load_f(up + i);
        swiglu_bwd(gf, uf, load_f(dout + i), a, b);
        store_f(dgate + i, a);
        store_f(dup + i, b);
        if constexpr (RECOMPUTE) store_f(h + i, swiglu_fwd(gf, uf));
    }
}

extern "C" __global__ void swiglu_backward(const DTYPE* __restrict__ gate,
                                           const DTYPE* __restrict__ up,
                                           const DTYPE* __restrict__ dout,
                                           DTYPE* __restrict__ dgate,
                                           DTYPE* __restrict__ dup,
                                           long long n) {
    swiglu_backward_pass<false>(gate, up, dout, dgate, dup, nullptr, n);
}

extern "C" __global__ void swiglu_backward_recompute(const DTYPE* __restrict__ gate,
                                                     const DTYPE* __restrict__ up,
                                                     const DTYPE* __restrict__ dout,
                                                     DTYPE* __restrict__ dgate,
                                                     DTYPE* __restrict__ dup,
                                                     DTYPE* __restrict__ h,
                                                     long long n) {
    swiglu_backward_pass<true>(gate, up, dout, dgate, dup, h, n);
}

// The recomputing backward in place, for an MLP that recomputes gate and up in its own backward
// (llamac.ops.lora.LoRASwiGLU): dgate over gate, dup over up, h over dout, so the pass needs no
// new (N, hidden) arrays. Each element is read and then written by one thread only; the pointers
// alias by design, so none is __restrict__ (the pass above may not be called with aliases).
extern "C" __global__ void swiglu_backward_recompute_inplace(DTYPE* gate, DTYPE* up, DTYPE* dout,
                                                             long long n) {
    const long long tid = global_thread_id();
    const long long stride = grid_stride();
    long long done = 0;

    if (is_aligned16(gate) && is_aligned16(up) && is_aligned16(dout)) {
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
                swiglu_bwd(gf, uf, to_float(d.v[k]), a, b);
                dg.v[k] = from_float<DTYPE>(a);
                du.v[k] = from_float<DTYPE>(b);
                o.v[k] = from_float<DTYPE>(swiglu_fwd(gf, uf));
            }
            store128(gate + p * V, dg);
            store128(up + p * V, du);
            store128(dout + p * V, o);
        }
        done = packs * V;
    }

    for (long long i = done + tid; i < n; i += stride) {
        float a, b;
        const float gf = load_f(gate + i), uf = load_f(up + i), df = load_f(dout + i);
        swiglu_bwd(gf, uf, df, a, b);
        store_f(gate + i, a);
        store_f(up + i, b);
        store_f(dout + i, swiglu_fwd(gf, uf));
    }
}
