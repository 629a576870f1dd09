// RMSNorm over the last axis: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), and the weight
// gradient's final reduction. The backward is kernels/add_rmsnorm.cu's with no residual gradient.
// NumPy references and launchers: llamac/ops/rmsnorm.py (rmsnorm_forward/backward).
//
// One warp per row (C is a few hundred to a few thousand: a warp's 32 lanes
// each take C/32 values, and the row reduction is five shuffles, no shared
// memory or __syncthreads). A row is read twice: the second pass hits L1/L2,
// so DRAM sees x once. Rows are 16-byte vectorized when every row start is
// aligned (C a multiple of the pack and aligned base pointers), else scalar.
//
// The weight gradient dw[c] = sum_rows dy * x * rstd must be deterministic, so
// there are no float atomics: in the backward each warp adds its rows into its own slice of
// shared memory (a lane owns fixed columns: no races), the block sums its
// warps' slices in warp order into partial[block, :], and rmsnorm_dw_reduce
// sums the blocks' partials in block order. The grid is fixed by the launcher
// (from the SM count, not the data), so the summation order never changes.

// With -DRMS_PACKS=K (K > 0) a lane keeps its K packs of the row in registers between the two
// passes instead of reading them again (from L2: the dw slices leave little L1); the launcher
// compiles K = the next power of two of C / (32 * pack) and uses the re-reading loop (K = 0) for
// rows too long for K <= 8. Unset, it is 4, so the CI compile check covers the cached path.
#ifndef RMS_PACKS
#define RMS_PACKS 4
#endif

LLAMAC_DEVICE float rms_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// True when x, every other pointer and every row start (row * C) are 16-byte aligned.
LLAMAC_DEVICE bool rms_rows_vectorizable(int C, const void* a, const void* b, const void* c, const void* d) {
    constexpr int P = Packed128<DTYPE>::size;
    return (C % P) == 0 && is_aligned16(a) && is_aligned16(b) && is_aligned16(c) && is_aligned16(d);
}

extern "C" __global__ void rmsnorm_forward(const DTYPE* __restrict__ x,     // (N, C)
                                           const DTYPE* __restrict__ w,     // (C,)
                                           DTYPE* __restrict__ y,           // (N, C)
                                           float* __restrict__ rstd,        // (N,)
                                           long long N, int C, float eps) {
    constexpr int P = Packed128<DTYPE>::size;
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const long long first = (long long)blockIdx.x * warps + (threadIdx.x >> 5);
    const long long stride = (long long)gridDim.x * warps;
    const bool vec = rms_rows_vectorizable(C, x, w, y, x);

#if RMS_PACKS > 0
    if (vec && C <= 32 * P * RMS_PACKS) {
        for (long long r = first; r < N; r += stride) {
            const DTYPE* xr = x + r * C;
            DTYPE* yr = y + r * C;
            Packed128<DTYPE> a[RMS_PACKS];
            float ss = 0.0f;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    a[j] = load128(xr + c);
#pragma unroll
                    for (int k = 0; k < P; ++k) { float f = to_float(a[j].v[k]); ss += f * f; }
                }
            }
            ss = rms_warp_sum(ss);
            const float rs = rsqrtf(ss / (float)C + eps);
            if (lane == 0) rstd[r] = rs;
#pragma unroll
            for (int j = 0; j < RMS_PACKS; ++j) {
                const int c = (lane + 32 * j) * P;
                if (c < C) {
                    const Packed128<DTYPE> g = load128(w + c);
                    Packed128<DTYPE> o;
#pragma unroll
                    for (int k = 0; k < P; ++k) o.v[k] = from_float<DTYPE>(to_float(a[j].v[k]) * rs * to_float(g.v[k]));
                    store128(yr + c, o);
                }
            }
        }
        return;
    }
#endif
    for (long long r = first; r < N; r += stride) {
        const DTYPE* xr = x + r * C;
        DTYPE* yr = y + r * C;
        float ss = 0.0f;
        if (vec) {
            for (int c = lane * P; c < C; c += 32 * P) {
                const Packed128<DTYPE> a = load128(xr + c);
#pragma unroll
                for (int k = 0; k < P; ++k) { float f = to_float(a.v[k]); ss += f * f; }
            }
        } else {
            for (int c = lane; c < C; c += 32) { float f = load_f(xr + c); ss += f * f; }
        }
        ss = rms_warp_sum(ss);
        const float rs = rsqrtf(ss / (float)C + eps);
        if (lane == 0) rstd[r] = rs;
        if (vec) {
            for (int c = lane * P; c < C; c += 32 * P) {
                const Packed128<DTYPE> a = load128(xr + c);
                const Packed128<DTYPE> g = load128(w + c);
                Packed128<DTYPE> o;
#pragma unroll
                for (int k = 0; k < P; ++k) o.v[k] = from_float<DTYPE>(to_float(a.v[k]) * rs * to_float(g.v[k]));
                store128(yr + c, o);
            }
        } else {
            for (int c = lane; c < C; c += 32) store_f(yr + c, load_f(xr + c) * rs * load_f(w + c));
        }
    }
}

// dw[c] = sum of partial[b, c] over the blocks b, in a fixed order, in fp32. Each block takes 32
// columns with its 8 warps: warp k sums blocks k, k + 8, ... (lanes read 32 adjacent columns:
// coalesced), then warp 0 adds the 8 warp sums in warp order. Launch with 256 threads.
extern "C" __global__ void rmsnorm_dw_reduce(const float* __restrict__ partial,  // (blocks, C)
                                             float* __restrict__ dw,             // (C,)
                                             int blocks, int C) {
    __shared__ float sums[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (c < C) {
        for (int b = warp; b < blocks; b += 8) s += partial[(long long)b * C + c];
    }
    sums[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && c < C) {
        float total = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) total += sums[k][lane];
        dw[c] = total;
    }
}
