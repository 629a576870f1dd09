// Rotary position embedding, Meta's interleaved layout: dims (2i, 2i+1) of every head rotate by
// angle t * freq_i, exactly as llamac/ops/rope.py:
//     out[2i]   = x[2i] * cos - x[2i+1] * sin
//     out[2i+1] = x[2i] * sin + x[2i+1] * cos
// The backward is the same rotation by -angle (sign = -1). NumPy reference and launchers:
// llamac/ops/rope.py (rope_forward/backward).
//
// out: (B, T, H, hs) contiguous; x: the same, or with x_row elements between consecutive
// positions (a (B, T, H, hs) view of q or k inside a packed (B, T, (H + 2 Hkv) hs) projection);
// cos, sin: (T, hs/2). The tables are fp32 unless compiled with -DROPE_TABLE_IN_DTYPE (then
// DTYPE, the model's own bf16 tables, widened exactly).
// Memory-bound: each thread moves one 16-byte pack (whole pairs, since a pack holds an even
// number of values) when hs is a multiple of the pack and x/out are aligned; else one pair.
// out may be x itself (each thread reads its values before writing them), so no __restrict__.

#ifdef ROPE_TABLE_IN_DTYPE
typedef DTYPE rope_table_t;
#else
typedef float rope_table_t;
#endif

// Products and sums rounded one at a time (no FMA contraction), as the reference and the decode
// kernel compute them, so that every path rotates to the same bits.
LLAMAC_DEVICE void rope_pair(float x0, float x1, float c, float s, float& o0, float& o1) {
    o0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    o1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

LLAMAC_DEVICE void rope_apply(const DTYPE* x, const rope_table_t* __restrict__ cosv,
                              const rope_table_t* __restrict__ sinv, DTYPE* out,
                              long long n, int T, int H, int hs, long long x_row, float sign) {
    const long long tid = global_thread_id();
    const long long stride = grid_stride();
    const long long row = (long long)H * hs;  // elements per position t of out
    const int half = hs >> 1;
    constexpr int P = Packed128<DTYPE>::size;
    if ((hs % P) == 0 && (x_row % P) == 0 && is_aligned16(x) && is_aligned16(out)) {
        for (long long p = tid; p < n / P; p += stride) {
            const long long e = p * P;
            const int t = (int)((e / row) % T);
            const int i0 = (int)(e % hs) >> 1;  // first pair of this pack
            const rope_table_t* ct = cosv + (long long)t * half + i0;
            const rope_table_t* st = sinv + (long long)t * half + i0;
            const Packed128<DTYPE> a = load128(x + (e / row) * x_row + e % row);
            Packed128<DTYPE> o;
#pragma unroll
            for (int k = 0; k < P / 2; ++k) {
                float o0, o1;
                rope_pair(to_float(a.v[2 * k]), to_float(a.v[2 * k + 1]), load_f(ct + k), sign * load_f(st + k), o0, o1);
                o.v[2 * k] = from_float<DTYPE>(o0);
                o.v[2 * k + 1] = from_float<DTYPE>(o1);
            }
            store128(out + e, o);
        }
        return;
    }
    for (long long q = tid; q < n / 2; q += stride) {
        const long long e = 2 * q;
        const int t = (int)((e / row) % T);
        const int i = (int)(e % hs) >> 1;
        const long long xe = (e / row) * x_row + e % row;
        float o0, o1;
        rope_pair(load_f(x + xe), load_f(x + xe + 1), load_f(cosv + (long long)t * half + i),
                  sign * load_f(sinv + (long long)t * half + i), o0, o1);
        store_f(out + e, o0);
        store_f(out + e + 1, o1);
    }
}

extern "C" __global__ void rope_forward(const DTYPE* x, const rope_table_t* __restrict__ cosv,
                                        const rope_table_t* __restrict__ sinv, DTYPE* out,
                                        long long n, int T, int H, int hs, long long x_row) {
    rope_apply(x, cosv, sinv, out, n, T, H, hs, x_row, 1.0f);
}

extern "C" __global__ void rope_backward(const DTYPE* dout, const rope_table_t* __restrict__ cosv,
                                         const rope_table_t* __restrict__ sinv, DTYPE* dx,
                                         long long n, int T, int H, int hs, long long x_row) {
    rope_apply(dout, cosv, sinv, dx, n, T, H, hs, x_row, -1.0f);
}
