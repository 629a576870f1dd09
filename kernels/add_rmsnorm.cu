// Residual add fused with the RMSNorm that follows it (every Llama block boundary):
//   s = x + h (rounded to DTYPE: the residual stream),  y = s * rstd * w,  rstd = 1/sqrt(mean(s^2) + eps)
// and its backward with the residual stream's incoming gradient folded in:
//   dx = (dy * w - shat * mean(dy * w * shat)) * rstd + dres,  partial[block, c] = sum dy * shat.
// NumPy references and launchers: llamac/ops/rmsnorm.py (add_rmsnorm_forward/backward).
//
// Unfused, the forward is an add (read 2, write 1) and a norm (read 1, write 1); fused it reads 2 and
// writes 2. The backward is a norm backward (read 2, write 1) and the add of the two gradients of s
// (read 2, write 1); fused it reads 3 and writes 1. Same layout as kernels/rmsnorm.cu: one warp per
// row, 16-byte packs kept in registers between the two passes when the row fits (RMS_PACKS), a
// scalar loop otherwise; the weight gradient goes through per-warp shared slices and
// rmsnorm.cu's rmsnorm_dw_reduce (fixed order: deterministic).

#ifndef RMS_PACKS
#define RMS_PACKS 4
#endif

LLAMAC_DEVICE float arms_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

LLAMAC_DEVICE bool arms_aligned(int C, const void* a, const void* b, const void* c, const void* d, const void* e) {
    constexpr int P = Packed128<DTYPE>::size;
    return (C % P) == 0 && is_aligned16(a) && is_aligned16(b) && is_aligned16(c) && is_aligned16(d) &&
           is_aligned16(e);
}

extern "C" __global__ void add_rmsnorm_forward(const DTYPE* __restrict__ x,     // (N, C) residual in
                                               const DTYPE* __restrict__ h,     // (N, C) branch output
                                               const DTYPE* __restrict__ w,     // (C,)
                                               DTYPE* __restrict__ s,           // (N, C) x + h
                                               DTYPE* __restrict__ y,           // (N, C) rmsnorm(s) * w
                                               float* __restrict__ rstd,        // (N,)
                                               long long N, int C, float eps) {
    constexpr int P = Packed128<DTYPE>::size;
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const long long first = (long long)blockIdx.x * warps + (threadIdx.x >> 5);
    const long long stride = (long long)gridDim.x * warps;
    const bool vec = arms_aligned(C, x, h, w, s, y);

#if RMS_PACKS > 0
    if (vec && C <= 32 * P * RMS_PACKS) {
        for (long long r = first; r < N; r += stride) {
            Packed128<DTYPE> a[RMS_PACKS];
            float ss = 0.0f;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    const Packed128<DTYPE> xa = load128(x + r * C + c), ha = load128(h + r * C + c);
#pragma unroll
                    for (int k = 0; k < P; ++k) {
                        // Round the sum first: the norm sees exactly the stored residual stream.
                        a[j].v[k] = from_float<DTYPE>(to_float(xa.v[k]) + to_float(ha.v[k]));
                        const float f = to_float(a[j].v[k]);
                        ss += f * f;
                    }
                    store128(s + r * C + c, a[j]);
                }
            }
            const float rs = rsqrtf(arms_warp_sum(ss) / (float)C + eps);
            if (lane == 0) rstd[r] = rs;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    const Packed128<DTYPE> g = load128(w + c);
                    Packed128<DTYPE> o;
#pragma unroll
                    for (int k = 0; k < P; ++k) o.v[k] = from_float<DTYPE>(to_float(a[j].v[k]) * rs * to_float(g.v[k]));
                    store128(y + r * C + c, o);
                }
            }
        }
        return;
    }
#endif
    // Scalar: each lane re-reads only the elements of s it wrote itself (no barrier needed).
    for (long long r = first; r < N; r += stride) {
        float ss = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const DTYPE v = from_float<DTYPE>(load_f(x + r * C + c) + load_f(h + r * C + c));
            s[r * C + c] = v;
            const float f = to_float(v);
            ss += f * f;
        }
        const float rs = rsqrtf(arms_warp_sum(ss) / (float)C + eps);
        if (lane == 0) rstd[r] = rs;
        for (int c = lane; c < C; c += 32) store_f(y + r * C + c, load_f(s + r * C + c) * rs * load_f(w + c));
    }
}

// dres may be null: the plain RMSNorm backward (llamac.ops.rmsnorm.rmsnorm_backward launches this kernel
// so). dx never aliases an input.
// Dynamic shared memory: (blockDim.x / 32) * C floats.
extern "C" __global__ void add_rmsnorm_backward(const DTYPE* __restrict__ dy,    // (N, C)
                                                const DTYPE* __restrict__ s,     // (N, C)
                                                const DTYPE* __restrict__ w,     // (C,)
                                                const float* __restrict__ rstd,  // (N,)
                                                const DTYPE* __restrict__ dres,  // (N, C) or null
                                                DTYPE* __restrict__ dx,          // (N, C)
                                                float* __restrict__ partial,     // (gridDim.x, C)
                                                long long N, int C) {
    extern __shared__ float dw_slices[];  // (warps, C)
    constexpr int P = Packed128<DTYPE>::size;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    float* mine = dw_slices + (long long)warp * C;
    for (int c = lane; c < C; c += 32) mine[c] = 0.0f;
    __syncwarp();
    const bool has_res = dres != nullptr;
    const bool vec = arms_aligned(C, dy, s, w, dx, has_res ? (const void*)dres : (const void*)dx);

#if RMS_PACKS > 0
    const bool cached = vec && C <= 32 * P * RMS_PACKS;
    if (cached) {
        for (long long r = (long long)blockIdx.x * warps + warp; r < N; r += (long long)gridDim.x * warps) {
            const float rs = rstd[r];
            Packed128<DTYPE> d[RMS_PACKS], a[RMS_PACKS];
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    d[j] = load128(dy + r * C + c);
                    a[j] = load128(s + r * C + c);
                    const Packed128<DTYPE> g = load128(w + c);
#pragma unroll
                    for (int k = 0; k < P; ++k) dot += to_float(d[j].v[k]) * to_float(g.v[k]) * to_float(a[j].v[k]);
                }
            }
            dot = arms_warp_sum(dot) * rs / (float)C;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    const Packed128<DTYPE> g = load128(w + c);
                    Packed128<DTYPE> e;
                    if (has_res) e = load128(dres + r * C + c);
                    Packed128<DTYPE> o;
#pragma unroll
                    for (int k = 0; k < P; ++k) {
                        const float sh = to_float(a[j].v[k]) * rs, df = to_float(d[j].v[k]);
                        const float add = has_res ? to_float(e.v[k]) : 0.0f;
                        o.v[k] = from_float<DTYPE>((df * to_float(g.v[k]) - sh * dot) * rs + add);
                        mine[k * (C / P) + c / P] += df * sh;   // pack-major: lanes hit distinct banks
                    }
                    store128(dx + r * C + c, o);
                }
            }
        }
    }
#else
    const bool cached = false;
#endif
    // Rows too long for registers (or unaligned): two passes over the row, 16-byte packs when aligned.
    for (long long r = (long long)blockIdx.x * warps + warp; !cached && r < N; r += (long long)gridDim.x * warps) {
        const float rs = rstd[r];
        float dot = 0.0f;   // sum(dy * w * s); times rs gives sum(dy * w * shat)
        if (vec) {
            for (int c = lane * P; c < C; c += 32 * P) {
                const Packed128<DTYPE> d = load128(dy + r * C + c), a = load128(s + r * C + c), g = load128(w + c);
#pragma unroll
                for (int k = 0; k < P; ++k) dot += to_float(d.v[k]) * to_float(g.v[k]) * to_float(a.v[k]);
            }
        } else {
            for (int c = lane; c < C; c += 32) dot += load_f(dy + r * C + c) * load_f(w + c) * load_f(s + r * C + c);
        }
        dot = arms_warp_sum(dot) * rs / (float)C;   // mean(dy * w * shat)
        if (vec) {
            for (int c = lane * P; c < C; c += 32 * P) {
                const Packed128<DTYPE> d = load128(dy + r * C + c), a = load128(s + r * C + c), g = load128(w + c);
                Packed128<DTYPE> e;
                if (has_res) e = load128(dres + r * C + c);
                Packed128<DTYPE> o;
#pragma unroll
                for (int k = 0; k < P; ++k) {
                    const float sh = to_float(a.v[k]) * rs, df = to_float(d.v[k]);
                    const float add = has_res ? to_float(e.v[k]) : 0.0f;
                    o.v[k] = from_float<DTYPE>((df * to_float(g.v[k]) - sh * dot) * rs + add);
                    mine[k * (C / P) + c / P] += df * sh;
                }
                store128(dx + r * C + c, o);
            }
        } else {
            for (int c = lane; c < C; c += 32) {
                const float sh = load_f(s + r * C + c) * rs, df = load_f(dy + r * C + c);
                const float add = has_res ? load_f(dres + r * C + c) : 0.0f;
                store_f(dx + r * C + c, (df * load_f(w + c) - sh * dot) * rs + add);
                mine[c] += df * sh;
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        const int slot = vec ? (c % P) * (C / P) + c / P : c;
        for (int k = 0; k < warps; ++k) acc += dw_slices[(long long)k * C + slot];
        partial[(long long)blockIdx.x * C + c] = acc;
    }
}
