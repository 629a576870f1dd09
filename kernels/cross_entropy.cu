// Softmax cross-entropy over logits (N, V) in their own dtype, never an fp32 (N, V) copy.
// NumPy references and launchers: llamac/ops/cross_entropy.py (cross_entropy_forward/backward).
//
// Forward, one block per row: each thread keeps a running (max, sum of exp(x - max)) over its
// strided share of the row (the online softmax: one read of the logits), the block merges the
// pairs in a fixed tree order, and lse = max + log(sum). loss = lse - logit[target], 0 for
// target == ignore_index. The fp32 lse (N,) is all the backward needs besides the logits.
//
// Backward, one block per row: dlogits = (exp(x - lse) - onehot(target)) * scale, written in the
// logits' dtype, where scale = g / count comes from DEVICE memory (no host sync) and rows with
// target == ignore_index get zeros. dlogits may be the logits buffer itself: each element is
// read and then written by the same thread, so the pointers are not __restrict__.
//
// A row starts 16-byte aligned only when V * sizeof(DTYPE) is a multiple of 16, so each row is
// walked as a scalar head up to the first aligned element, 16-byte packs, and a scalar tail.

#define CE_NEG_INF (-__int_as_float(0x7f800000))

// Merge running (m, s) with (m2, s2): both sums are of exp(x - their max).
LLAMAC_DEVICE void ce_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == CE_NEG_INF) return;  // both empty (or all -inf): nothing to add, avoids inf - inf
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

LLAMAC_DEVICE void ce_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * __expf(m - x) + 1.0f;
        m = x;
    } else if (x != CE_NEG_INF) {  // a masked logit adds nothing (and -inf - -inf would be NaN)
        s += __expf(x - m);
    }
}

// One 16-byte store, as inline PTX: with the per-element select below, NVCC otherwise splits
// store128 into eight 2-byte stores.
LLAMAC_DEVICE void ce_store128(DTYPE* p, const Packed128<DTYPE>& x) {
    const unsigned int* w = reinterpret_cast<const unsigned int*>(&x);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
}

// Elements before the first 16-byte boundary of p (at most V).
LLAMAC_DEVICE int ce_head(const DTYPE* p, int V) {
    const int bytes = (int)((16u - (unsigned)(reinterpret_cast<unsigned long long>(p) & 15ull)) & 15u);
    const int h = bytes / (int)sizeof(DTYPE);
    return h < V ? h : V;
}

extern "C" __global__ void cross_entropy_forward(const DTYPE* __restrict__ logits,      // (N, V)
                                                 const long long* __restrict__ targets, // (N,)
                                                 float* __restrict__ lse,               // (N,)
                                                 float* __restrict__ loss,              // (N,)
                                                 long long N, int V, long long ignore_index) {
    constexpr int P = Packed128<DTYPE>::size;
    __shared__ float sm[32], ss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (long long r = blockIdx.x; r < N; r += gridDim.x) {
        const DTYPE* row = logits + r * V;
        float m = CE_NEG_INF, s = 0.0f;
        const int head = ce_head(row, V);
        const int packs = (V - head) / P;
        for (int c = threadIdx.x; c < head; c += blockDim.x) ce_add(m, s, load_f(row + c));
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            const Packed128<DTYPE> a = load128(row + head + p * P);
            // One rescale per pack, not per element: max of the pack first, then P exps, no branches inside.
            float xs[P], pm = CE_NEG_INF;
#pragma unroll
            for (int k = 0; k < P; ++k) { xs[k] = to_float(a.v[k]); pm = fmaxf(pm, xs[k]); }
            if (pm > m) { s *= __expf(m - pm); m = pm; }
            if (m != CE_NEG_INF) {
#pragma unroll
                for (int k = 0; k < P; ++k) s += __expf(xs[k] - m);  // exp(-inf - m) = 0 for masked logits
            }
        }
        for (int c = head + packs * P + threadIdx.x; c < V; c += blockDim.x) ce_add(m, s, load_f(row + c));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            ce_merge(m, s, m2, s2);
        }
        if (lane == 0) { sm[warp] = m; ss[warp] = s; }
        __syncthreads();
        if (threadIdx.x == 0) {
            float M = sm[0], S = ss[0];
            for (int w = 1; w < warps; ++w) ce_merge(M, S, sm[w], ss[w]);
            const float l = M + logf(S);
            const long long t = targets[r];
            lse[r] = l;
            loss[r] = (t == ignore_index || t < 0 || t >= V) ? 0.0f : l - load_f(row + t);
        }
        __syncthreads();  // sm/ss are reused by the next row
    }
}

extern "C" __global__ void cross_entropy_backward(const DTYPE* logits,                    // (N, V)
                                                  const long long* __restrict__ targets,  // (N,)
                                                  const float* __restrict__ lse,          // (N,)
                                                  const float* __restrict__ scale,        // (1,) g / count
                                                  DTYPE* dlogits,                         // (N, V)
                                                  long long N, int V, long long ignore_index) {
    constexpr int P = Packed128<DTYPE>::size;
    const float g = scale[0];
    for (long long r = blockIdx.x; r < N; r += gridDim.x) {
        const DTYPE* row = logits + r * V;
        DTYPE* drow = dlogits + r * V;
        const long long t = targets[r];
        const bool valid = !(t == ignore_index || t < 0 || t >= V);
        const float l = lse[r];
        const float gr = valid ? g : 0.0f;
        // Same offset within 16 bytes for both rows, else everything goes the scalar way.
        const bool same = ((reinterpret_cast<unsigned long long>(row) ^ reinterpret_cast<unsigned long long>(drow)) & 15ull) == 0;
        const int head = same ? ce_head(row, V) : V;
        const int packs = (V - head) / P;
        for (int c = threadIdx.x; c < head; c += blockDim.x) {
            const float p = valid ? __expf(load_f(row + c) - l) : 0.0f;
            store_f(drow + c, (p - (c == t ? 1.0f : 0.0f)) * gr);
        }
        for (int q = threadIdx.x; q < packs; q += blockDim.x) {
            const int c0 = head + q * P;
            const Packed128<DTYPE> a = load128(row + c0);
            Packed128<DTYPE> o;
#pragma unroll
            for (int k = 0; k < P; ++k) {
                const float p = valid ? __expf(to_float(a.v[k]) - l) : 0.0f;
                o.v[k] = from_float<DTYPE>((p - (c0 + k == t ? 1.0f : 0.0f)) * gr);
            }
            ce_store128(drow + c0, o);
        }
        for (int c = head + packs * P + threadIdx.x; c < V; c += blockDim.x) {
            const float p = valid ? __expf(load_f(row + c) - l) : 0.0f;
            store_f(drow + c, (p - (c == t ? 1.0f : 0.0f)) * gr);
        }
    }
}
