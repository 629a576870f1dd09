// Decoding one token at a time (batch M <= 16 rows), the whole step replayed as a CUDA graph.
// NumPy references and launchers: llamac/infer/decode.py (FastDecoder).
//
// Always bf16 (the decoder converts every model to bf16), so DTYPE is unused here.
// The model's shape arrives as -D options (decode.py compiles one module per shape):
//   HEAD_DIM (hs, a multiple of 8, <= 256), GROUP (query heads per kv head).
//
// Rounding follows llamac's plain bf16 path (model.forward with a KVCache) op by op:
// every linear output is rounded to bf16, RoPE rounds as fused._rotate does,
// attention rounds q.k and the normalised probabilities, residual adds round once.
// Sums are fp32 everywhere, so only the summation order differs.

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef GROUP
#define GROUP 1
#endif

#define NEG_INF (-__int_as_float(0x7f800000))
#define MAX_ROWS 16          // batch rows one GEMV carries (the m16 of the mma)
#define GEMV_MAX_WARPS 16
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4        // 32-element chunks of a weight row each lane has in flight per round
#endif
#ifndef ATTN_CHUNK
#define ATTN_CHUNK 64        // keys per attention block: contexts split over blocks (decode.py sets it)
#endif
#define ATTN_WARPS 8

static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 8, at most 256");
static_assert(GROUP >= 1 && GROUP <= 16, "at most 16 query heads per kv head");
// decode_attention's shared memory: scores (GROUP x chunk) and per-warp P.V partials
static_assert(GROUP * (ATTN_CHUNK + 8 * HEAD_DIM) * 4 <= 48000, "GROUP * head_dim too large for decode_attention");

// Programmatic dependent launch (sm_90): a kernel launched with the attribute may start while
// the kernel before it finishes; it must not read that kernel's outputs (or write what that kernel
// reads) before grid_dependency_wait. Without the attribute both are no-ops.
LLAMAC_DEVICE void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
LLAMAC_DEVICE void grid_dependency_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

LLAMAC_DEVICE float bf16r(float x) { return to_float(from_float<bf16_t>(x)); }

LLAMAC_DEVICE unsigned int pack_bf16x2(float lo, float hi) {
    return (unsigned int)from_float<bf16_t>(lo).bits | ((unsigned int)from_float<bf16_t>(hi).bits << 16);
}

LLAMAC_DEVICE float lo_bf16(unsigned int u) { return __uint_as_float(u << 16); }
LLAMAC_DEVICE float hi_bf16(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

LLAMAC_DEVICE void unpack8(const uint4& u, float* f) {
    f[0] = lo_bf16(u.x); f[1] = hi_bf16(u.x); f[2] = lo_bf16(u.y); f[3] = hi_bf16(u.y);
    f[4] = lo_bf16(u.z); f[5] = hi_bf16(u.z); f[6] = lo_bf16(u.w); f[7] = hi_bf16(u.w);
}

LLAMAC_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

LLAMAC_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// D += A (16x16, row) * B (16x8, col), bf16 in, fp32 accumulate.
LLAMAC_DEVICE void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ================================================================ GEMV, M <= 16 rows
// y (M, N) = norm?(x) (M, K) @ W (N, K)^T, then an epilogue. A tile is 8 output features (the
// n8 of one mma); the grid is persistent (as many blocks as the GPU holds, tiles spread evenly)
// and a block's warps split K. The mma's k order is free (a sum), so each lane loads 8
// consecutive k of one weight row in one 16-byte load and the x fragments take the same
// permutation: lane (g = lane/4, q = lane%4) holds W row n0+g and x rows g, g+8 at k = 32c + 8q .. +7.
// Every weight byte is read once for all M rows, which makes batch 16 nearly free.

#define MODE_STORE 0     // out bf16 (M, N)
#define MODE_RESID 1     // out bf16 (M, N) += bf16(y), rounded once (the residual stream)
#define MODE_SWIGLU 2    // rows interleaved (gate_j, up_j): out bf16 (M, N/2) = silu(g) * u
#define MODE_LOGITS 3    // out fp32 (M, N) = bf16(y) (logits, as the plain path rounds them), and each
                         // row's argmax over the first V into best[m] (argmax_key), for greedy sampling
#define MODE_QKV 4       // RoPE on q and k, q -> out (M, Nq), k and v -> the caches at lens[m]

struct EpilogueArgs {
    bf16_t* k_cache;     // (M, max_len, Hkv, hs)
    bf16_t* v_cache;
    const bf16_t* cos;   // (max_len, hs/2), bf16 like the plain path's tables
    const bf16_t* sin;
    const int* lens;     // (M,) tokens already cached: the new token's position
    int n_heads, n_kv_heads, max_len;
    unsigned long long* best;   // MODE_LOGITS: (M,) running argmax keys, zeroed by decode_sample
    int V;
};

// A logit and its index as one integer whose order is (value, then lower index first), so that
// an atomicMax over a row's keys is NumPy's argmax: float bits made monotonic, -0 taken as +0.
LLAMAC_DEVICE unsigned long long argmax_key(float v, int n) {
    unsigned int u = __float_as_uint(v == 0.0f ? 0.0f : v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned int)(0x7fffffff - n);
}
LLAMAC_DEVICE int argmax_index(unsigned long long key) { return 0x7fffffff - (int)(key & 0xffffffffu); }

LLAMAC_DEVICE uint4 load_x8(const bf16_t* x, const bf16_t* norm_w, float rstd, int row, int K, int k) {
    uint4 u = __ldg(reinterpret_cast<const uint4*>(x + (size_t)row * K + k));
    if (norm_w == nullptr) return u;
    // RMSNorm as fused.RMSNorm rounds it: bf16((x * rstd) * w), products in fp32.
    uint4 w = __ldg(reinterpret_cast<const uint4*>(norm_w + k));
    float xf[8], wf[8];
    unpack8(u, xf);
    unpack8(w, wf);
    uint4 r;
    r.x = pack_bf16x2(__fmul_rn(__fmul_rn(xf[0], rstd), wf[0]), __fmul_rn(__fmul_rn(xf[1], rstd), wf[1]));
    r.y = pack_bf16x2(__fmul_rn(__fmul_rn(xf[2], rstd), wf[2]), __fmul_rn(__fmul_rn(xf[3], rstd), wf[3]));
    r.z = pack_bf16x2(__fmul_rn(__fmul_rn(xf[4], rstd), wf[4]), __fmul_rn(__fmul_rn(xf[5], rstd), wf[5]));
    r.w = pack_bf16x2(__fmul_rn(__fmul_rn(xf[6], rstd), wf[6]), __fmul_rn(__fmul_rn(xf[7], rstd), wf[7]));
    return r;
}

// Rotate one interleaved pair (a, b) by (c, s) as RoPE's reference does (llamac.ops.rope.rope_reference):
// every product and sum in fp32, one rounding to bf16 at the output. __fmul_rn / __fsub_rn keep
// the compiler from contracting them into FMAs, which would round differently.
LLAMAC_DEVICE void rope_pair(float& a, float& b, float c, float s) {
    const float ra = bf16r(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    const float rb = bf16r(__fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)));
    a = ra;
    b = rb;
}

// One (row m, output pair n, n+1) of a finished tile: the warps' partial sums added in a fixed
// order, rounded to bf16 as the plain path rounds a linear output, then the mode's epilogue.
template <int MODE>
LLAMAC_DEVICE void gemv_epilogue(const float (*red)[MAX_ROWS][8], int nw, int m, int col, int n, int N, void* out,
                                 const EpilogueArgs& qa, unsigned long long& best) {
    float y0 = 0.0f, y1 = 0.0f;
    for (int w = 0; w < nw; ++w) {
        y0 += red[w][m][col];
        y1 += red[w][m][col + 1];
    }
    y0 = bf16r(y0);
    y1 = bf16r(y1);
    if (MODE == MODE_STORE) {
        bf16_t* o = static_cast<bf16_t*>(out) + (size_t)m * N + n;
        store_f(o, y0);
        store_f(o + 1, y1);
    } else if (MODE == MODE_RESID) {
        bf16_t* o = static_cast<bf16_t*>(out) + (size_t)m * N + n;
        store_f(o, load_f(o) + y0);
        store_f(o + 1, load_f(o + 1) + y1);
    } else if (MODE == MODE_SWIGLU) {
        // as kernels/swiglu.cu: g * sigmoid(g) * u on the bf16-rounded gate and up
        store_f(static_cast<bf16_t*>(out) + (size_t)m * (N / 2) + n / 2, y0 * sigmoidf_safe(y0) * y1);
    } else if (MODE == MODE_LOGITS) {
        float* o = static_cast<float*>(out) + (size_t)m * N + n;
        o[0] = y0;
        o[1] = y1;
        if (n < qa.V) best = max(best, argmax_key(y0, n));
        if (n + 1 < qa.V) best = max(best, argmax_key(y1, n + 1));
    } else {  // MODE_QKV
        const int hs = HEAD_DIM, nq = qa.n_heads * hs, nkv = qa.n_kv_heads * hs;
        const int pos = min(qa.lens[m], qa.max_len - 1);
        const int region = n < nq ? 0 : (n < nq + nkv ? 1 : 2);
        const int nn = n - (region == 0 ? 0 : (region == 1 ? nq : nq + nkv));
        const int d = nn % hs, head = nn / hs;
        if (region < 2) {
            const float cs = load_f(qa.cos + (size_t)pos * (hs / 2) + d / 2);
            const float sn = load_f(qa.sin + (size_t)pos * (hs / 2) + d / 2);
            rope_pair(y0, y1, cs, sn);
        }
        bf16_t* o;
        if (region == 0) {
            o = static_cast<bf16_t*>(out) + (size_t)m * nq + nn;
        } else {
            bf16_t* cache = region == 1 ? qa.k_cache : qa.v_cache;
            o = cache + (((size_t)m * qa.max_len + pos) * qa.n_kv_heads + head) * hs + d;
        }
        store_f(o, y0);
        store_f(o + 1, y1);
    }
}

// The rows' 1/rms for a norm-fused GEMV, once per block: each row's sum of squares split over
// blockDim / Mp threads (Mp: M rounded up to a power of two), reduced in a fixed order.
LLAMAC_DEVICE void block_rstd(const bf16_t* __restrict__ x, int M, int K, float eps, float* rstd_s, float* part_s) {
    int Mp = 1;
    while (Mp < M) Mp <<= 1;
    const int tpr = blockDim.x / Mp, m = threadIdx.x / tpr, r = threadIdx.x % tpr;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float ss = 0.0f;
    if (m < M) {
#pragma unroll 4
        for (int k = r * 8; k < K; k += tpr * 8) {
            float f[8];
            unpack8(__ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)), f);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss = __fadd_rn(ss, __fmul_rn(f[e], f[e]));
        }
    }
    if (tpr <= 32) {
        for (int o = tpr / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (r == 0 && m < M) rstd_s[m] = 1.0f / sqrtf(ss / (float)K + eps);
    } else {
        ss = warp_sum(ss);
        if (lane == 0) part_s[warp] = ss;
        __syncthreads();
        if (r == 0 && m < M) {
            float t = 0.0f;
            for (int w = 0; w < tpr / 32; ++w) t += part_s[m * (tpr / 32) + w];
            rstd_s[m] = 1.0f / sqrtf(t / (float)K + eps);
        }
    }
    __syncthreads();
}

// A persistent GEMV: block b takes tiles b, b + gridDim.x, ... of 8 output features, each in
// `rounds` rounds of nw * U chunks; the weight loads of the next (tile, round) are in flight
// while this one's x loads, mmas and (at a tile's end) reduction and epilogue run, so a block
// streams weights without a gap between its tiles, and 1/rms is computed once per block.
template <int MODE>
LLAMAC_DEVICE void gemv_body(const bf16_t* __restrict__ x, int M, int K, const bf16_t* __restrict__ norm_w,
                             float eps, const bf16_t* __restrict__ W, int N, void* out, const EpilogueArgs& qa) {
    __shared__ float red[GEMV_MAX_WARPS][MAX_ROWS][8];
    __shared__ float rstd_s[MAX_ROWS];
    __shared__ float part_s[GEMV_MAX_WARPS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    constexpr int U = GEMV_UNROLL;   // chunks in flight per warp
    const int tiles = N / 8, chunks = (K + 31) >> 5;
    const int rounds = (chunks + nw * U - 1) / (nw * U);
    const int steps = (tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x * rounds;

    auto load_w = [&](int s, uint4* w) {
        const int tile = blockIdx.x + (s / rounds) * gridDim.x, base = (s % rounds) * nw * U + warp;
        const bf16_t* wrow = W + (size_t)(tile * 8 + g) * K;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (base + u * nw) * 32 + q * 8;
            w[u] = s < steps && base + u * nw < chunks && k < K ? __ldg(reinterpret_cast<const uint4*>(wrow + k))
                                                               : make_uint4(0, 0, 0, 0);
        }
    };

    // The first weights are loaded before waiting on the kernel that writes x: with programmatic
    // dependent launch (decode.py) these loads overlap the previous kernel's tail.
    uint4 wv[U];
    load_w(0, wv);
    grid_dependency_launch_dependents();
    grid_dependency_wait();
    // A norm-fused GEMV normalises its rows once into shared memory (M x K bf16, dynamic: the
    // launcher sizes it): normalising each fragment as it is loaded costs more instructions than the
    // SM can issue while streaming weights at full bandwidth.
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    const bf16_t* xs = x;
    if (norm_w != nullptr) {
        block_rstd(x, M, K, eps, rstd_s, part_s);
        bf16_t* xn = reinterpret_cast<bf16_t*>(gemv_smem);
        const int per_row = K / 8;
        for (int i = threadIdx.x; i < M * per_row; i += blockDim.x) {
            const int m = i / per_row, k = (i - m * per_row) * 8;
            *reinterpret_cast<uint4*>(xn + (size_t)m * K + k) = load_x8(x, norm_w, rstd_s[m], m, K, k);
        }
        __syncthreads();
        xs = xn;
    }

    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    unsigned long long best = 0;     // MODE_LOGITS: this thread's argmax key over its outputs
    for (int s = 0; s < steps; ++s) {
        uint4 wn[U], xa[U], xb[U];
        load_w(s + 1, wn);
        const int base = (s % rounds) * nw * U + warp;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (base + u * nw) * 32 + q * 8;
            const bool ok = base + u * nw < chunks && k < K;
            xa[u] = ok && g < M ? *reinterpret_cast<const uint4*>(xs + (size_t)g * K + k) : make_uint4(0, 0, 0, 0);
            xb[u] = ok && g + 8 < M ? *reinterpret_cast<const uint4*>(xs + (size_t)(g + 8) * K + k) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            mma_bf16(c, xa[u].x, xb[u].x, xa[u].y, xb[u].y, wv[u].x, wv[u].y);
            mma_bf16(c, xa[u].z, xb[u].z, xa[u].w, xb[u].w, wv[u].z, wv[u].w);
            wv[u] = wn[u];
        }
        if (s % rounds == rounds - 1) {
            red[warp][g][2 * q] = c[0];
            red[warp][g][2 * q + 1] = c[1];
            red[warp][g + 8][2 * q] = c[2];
            red[warp][g + 8][2 * q + 1] = c[3];
            c[0] = c[1] = c[2] = c[3] = 0.0f;
            __syncthreads();
            const int t = threadIdx.x;
            if (t < M * 4) {
                const int tile = blockIdx.x + (s / rounds) * gridDim.x;
                gemv_epilogue<MODE>(red, nw, t >> 2, 2 * (t & 3), tile * 8 + 2 * (t & 3), N, out, qa, best);
            }
            __syncthreads();
        }
    }
    if (MODE == MODE_LOGITS && qa.best != nullptr && threadIdx.x < 64) {
        // row m's 4 threads are lanes 4m..4m+3 of one warp: one atomic per row and block
        best = max(best, __shfl_xor_sync(0xffffffffu, best, 1));
        best = max(best, __shfl_xor_sync(0xffffffffu, best, 2));
        if (threadIdx.x < M * 4 && (threadIdx.x & 3) == 0) atomicMax(qa.best + (threadIdx.x >> 2), best);
    }
}

#define GEMV_PARAMS const bf16_t* __restrict__ x, int M, int K, const bf16_t* __restrict__ norm_w, float eps, \
                    const bf16_t* __restrict__ W, int N

extern "C" __global__ void decode_gemv_store(GEMV_PARAMS, bf16_t* out) {
    gemv_body<MODE_STORE>(x, M, K, norm_w, eps, W, N, out, EpilogueArgs{});
}
extern "C" __global__ void decode_gemv_resid(GEMV_PARAMS, bf16_t* out) {
    gemv_body<MODE_RESID>(x, M, K, norm_w, eps, W, N, out, EpilogueArgs{});
}
extern "C" __global__ void decode_gemv_swiglu(GEMV_PARAMS, bf16_t* out) {
    gemv_body<MODE_SWIGLU>(x, M, K, norm_w, eps, W, N, out, EpilogueArgs{});
}
extern "C" __global__ void decode_gemv_logits(GEMV_PARAMS, float* out, unsigned long long* best, int V) {
    EpilogueArgs qa{};
    qa.best = best;
    qa.V = V;
    gemv_body<MODE_LOGITS>(x, M, K, norm_w, eps, W, N, out, qa);
}
extern "C" __global__ void decode_gemv_qkv(GEMV_PARAMS, bf16_t* q_out, bf16_t* k_cache, bf16_t* v_cache,
                                           const bf16_t* cos, const bf16_t* sin, const int* lens,
                                           int n_heads, int n_kv_heads, int max_len) {
    EpilogueArgs qa{k_cache, v_cache, cos, sin, lens, n_heads, n_kv_heads, max_len, nullptr, 0};
    gemv_body<MODE_QKV>(x, M, K, norm_w, eps, W, N, q_out, qa);
}

// ================================================================ decode attention
// One block per (row m, kv head, chunk of ATTN_CHUNK keys): the GROUP query heads that
// share a kv head read each key and value once. Only the filled part of the cache is
// read: lens[m] + extra keys (extra = 1: the token this step just wrote).
// Chunks are short so that even a short context spreads over several blocks (a block's
// keys are read in a couple of latency-bound passes). One chunk: exact plain-path rounding,
// probabilities normalised and rounded to bf16 before P.V. Several chunks: each block writes
// (max, sum, unnormalised P.V) and the last block to finish (a counter) combines them,
// flash-decoding style, in fp32.

#define KEY_LANES (HEAD_DIM <= 32 ? 4 : (HEAD_DIM <= 64 ? 8 : (HEAD_DIM <= 128 ? 16 : 32)))

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
decode_attention(const bf16_t* __restrict__ q,     // (M, H, hs)
                 const bf16_t* __restrict__ kc,    // (M, max_len, Hkv, hs)
                 const bf16_t* __restrict__ vc,
                 const int* __restrict__ lens, int extra,
                 bf16_t* __restrict__ out,         // (M, H, hs)
                 float* __restrict__ part,         // (M*Hkv, n_split, GROUP, hs + 2) scratch
                 int* __restrict__ counters,       // (M*Hkv,), zero between launches
                 int n_kv_heads, int max_len, int n_split, float scale) {
    constexpr int KL = KEY_LANES, SLOTS = ATTN_WARPS * (32 / KL);
    __shared__ float sc[GROUP][ATTN_CHUNK];
    __shared__ float red[ATTN_WARPS][GROUP][HEAD_DIM];
    __shared__ float ml[GROUP][2];
    __shared__ int last_s;
    grid_dependency_launch_dependents();
    grid_dependency_wait();
    const int bh = blockIdx.x, m = bh / n_kv_heads, kh = bh % n_kv_heads, split = blockIdx.y;
    const int T = min(lens[m] + extra, max_len);
    const int active = (T + ATTN_CHUNK - 1) / ATTN_CHUNK;
    if (split >= active) return;
    const int j0 = split * ATTN_CHUNK, n = min(ATTN_CHUNK, T - j0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane % KL, d0 = sub * 8;
    const bool dok = d0 < HEAD_DIM;
    const int H = n_kv_heads * GROUP;

    float qf[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        if (dok) unpack8(__ldg(reinterpret_cast<const uint4*>(q + ((size_t)m * H + kh * GROUP + g) * HEAD_DIM + d0)), qf[g]);
        else for (int e = 0; e < 8; ++e) qf[g][e] = 0.0f;
    }
    const size_t row_stride = (size_t)n_kv_heads * HEAD_DIM;
    const bf16_t* kbase = kc + ((size_t)m * max_len + j0) * row_stride + kh * HEAD_DIM + d0;
    const bf16_t* vbase = vc + ((size_t)m * max_len + j0) * row_stride + kh * HEAD_DIM + d0;

    // scores: s = bf16(q.k) * scale (the plain path rounds the q k^T matmul to bf16)
    for (int jb = warp * (32 / KL); jb < n; jb += SLOTS) {
        const int jj = jb + lane / KL;
        const bool ok = jj < n && dok;
        float kf[8];
        if (ok) unpack8(__ldg(reinterpret_cast<const uint4*>(kbase + (size_t)jj * row_stride)), kf);
        else for (int e = 0; e < 8; ++e) kf[e] = 0.0f;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s = fmaf(qf[g][e], kf[e], s);
#pragma unroll
            for (int o = KL / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (sub == 0 && jj < n) sc[g][jj] = bf16r(s) * scale;
        }
    }
    __syncthreads();

    // softmax per head, one warp per head, in fp32 as the reference
    for (int g = warp; g < GROUP; g += ATTN_WARPS) {
        float mx = NEG_INF;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[g][j]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int j = lane; j < n; j += 32) {
            const float e = expf(sc[g][j] - mx);
            sc[g][j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (active == 1) {
            for (int j = lane; j < n; j += 32) sc[g][j] = bf16r(sc[g][j] / sum);
        }
        if (lane == 0) {
            ml[g][0] = mx;
            ml[g][1] = sum;
        }
    }
    __syncthreads();

    // P.V: each lane accumulates 8 dims of GROUP heads over its keys
    float acc[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    for (int jb = warp * (32 / KL); jb < n; jb += SLOTS) {
        const int jj = jb + lane / KL;
        if (jj < n && dok) {
            float vf[8];
            unpack8(__ldg(reinterpret_cast<const uint4*>(vbase + (size_t)jj * row_stride)), vf);
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const float p = sc[g][jj];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
            }
        }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float a = acc[g][e];
#pragma unroll
            for (int o = KL; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            acc[g][e] = a;
        }
    if (lane < KL && dok) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) red[warp][g][d0 + e] = acc[g][e];
    }
    __syncthreads();

    if (active == 1) {
        for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += blockDim.x) {
            const int g = i / HEAD_DIM, d = i % HEAD_DIM;
            float s = 0.0f;
            for (int w = 0; w < ATTN_WARPS; ++w) s += red[w][g][d];
            store_f(out + ((size_t)m * H + kh * GROUP + g) * HEAD_DIM + d, s);
        }
        return;
    }
    // several chunks: publish this chunk's partial result, the last block combines
    constexpr int PS = HEAD_DIM + 2;
    float* mine = part + ((size_t)bh * n_split + split) * GROUP * PS;
    for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += blockDim.x) {
        const int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float s = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) s += red[w][g][d];
        mine[g * PS + d] = s;
    }
    if (threadIdx.x < GROUP) {
        mine[threadIdx.x * PS + HEAD_DIM] = ml[threadIdx.x][0];
        mine[threadIdx.x * PS + HEAD_DIM + 1] = ml[threadIdx.x][1];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_s = atomicAdd(counters + bh, 1) == active - 1;
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    const float* all = part + (size_t)bh * n_split * GROUP * PS;
    for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += blockDim.x) {
        const int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float mx = NEG_INF;
        for (int s = 0; s < active; ++s) mx = fmaxf(mx, __ldcg(all + (s * GROUP + g) * PS + HEAD_DIM));
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < active; ++s) {
            const float* p = all + (s * GROUP + g) * PS;
            const float w = expf(__ldcg(p + HEAD_DIM) - mx);
            num += w * __ldcg(p + d);
            den += w * __ldcg(p + HEAD_DIM + 1);
        }
        store_f(out + ((size_t)m * H + kh * GROUP + g) * HEAD_DIM + d, num / den);
    }
    if (threadIdx.x == 0) counters[bh] = 0;   // ready for the next layer / replay
}

// ================================================================ sampling on the device
// One block of 1024 threads per row. Greedy (temperature <= 0): argmax, lowest index on
// ties (NumPy's). Otherwise Gumbel-max over the kept tokens: argmax(l/T - log(-log u)) is
// an exact draw from softmax(l/T), with u a counter-based hash of (seed, step, row, j), so a
// seed reproduces a run and nothing crosses to the host. top-k and top-p cut the
// candidates by a threshold key found by radix select (4 passes of 8 bits): top-k on
// counts, top-p on fixed-point probability mass (integer atomics: order-independent).
// Then: the token goes to the history, its embedding row becomes the next step's input,
// and (advance) the row's cache length grows by one.

#define SAMPLE_THREADS 1024

LLAMAC_DEVICE unsigned int fmix32(unsigned int h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}

LLAMAC_DEVICE float rng_uniform(unsigned int seed, unsigned int step, unsigned int row, unsigned int j) {
    unsigned int h = fmix32(seed ^ 0x9e3779b9u);
    h = fmix32(h ^ step);
    h = fmix32(h ^ row);
    h = fmix32(h ^ j);
    return ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// monotone: a > b as floats <=> key(a) > key(b) as unsigned
LLAMAC_DEVICE unsigned int float_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The threshold key tau with sum_{key >= tau} weight >= target, tau the largest such
// (the target-th unit from the top). weight(j) is count 1 (top-k) or a fixed-point mass.
template <typename Weight>
LLAMAC_DEVICE unsigned int radix_threshold(const float* lg, int V, float inv_t, unsigned int floor_key,
                                           unsigned long long target, Weight weight,
                                           unsigned long long* hist, unsigned int* shared_word) {
    unsigned int prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const unsigned int key = float_key(lg[j] * inv_t);
            if (key >= floor_key && (key & mask) == prefix) atomicAdd(hist + ((key >> shift) & 255u), weight(j, key));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long cum = 0;
            int b = 255;
            for (; b > 0; --b) {
                if (cum + hist[b] >= target) break;
                cum += hist[b];
            }
            target -= cum;
            shared_word[0] = (unsigned int)b;
            shared_word[1] = (unsigned int)(target & 0xffffffffu);
            shared_word[2] = (unsigned int)(target >> 32);
        }
        __syncthreads();
        prefix |= shared_word[0] << shift;
        mask |= 255u << shift;
        target = (unsigned long long)shared_word[1] | ((unsigned long long)shared_word[2] << 32);
        __syncthreads();
    }
    return prefix;
}

struct CountWeight {
    LLAMAC_DEVICE unsigned long long operator()(int, unsigned int) const { return 1ull; }
};

struct MassWeight {
    const float* lg;
    float inv_t, mx;
    LLAMAC_DEVICE unsigned long long operator()(int j, unsigned int) const {
        return (unsigned long long)(expf(lg[j] * inv_t - mx) * 2147483648.0f);
    }
};

LLAMAC_DEVICE void block_argmax(float v, int i, float* sv, int* si, float& best_v, int& best_i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        v = lane < nw ? sv[lane] : NEG_INF;
        i = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
        }
        if (lane == 0) { sv[0] = v; si[0] = i; }
    }
    __syncthreads();
    best_v = sv[0];
    best_i = si[0];
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
decode_sample(const float* __restrict__ logits, int V, int ld,   // (M, ld), the first V real
              float temperature, int top_k, float top_p, unsigned int seed,
              int* __restrict__ tokens,                    // (M,) the chosen token
              int* __restrict__ history, int max_steps,    // (max_steps, M)
              int* __restrict__ steps,                     // (M,) tokens chosen so far
              int* __restrict__ lens, int advance,         // (M,) cache lengths
              const bf16_t* __restrict__ emb, int C,       // (V, C) embeddings
              bf16_t* __restrict__ x,                      // (M, C) next step's input
              unsigned long long* __restrict__ best) {     // (M,) argmax keys from decode_gemv_logits, or null
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ unsigned long long hist[256];
    __shared__ unsigned int word[3];
    grid_dependency_wait();
    const int m = blockIdx.x, M = gridDim.x;
    const float* lg = logits + (size_t)m * ld;
    const int step = steps[m];
    float top;
    int token;
    if (best != nullptr && temperature <= 0.0f) {
        // greedy with the head's argmax at hand: no pass over the logits
        if (threadIdx.x == 0) {
            si[0] = argmax_index(best[m]);
            best[m] = 0ull;          // ready for the next step's head
        }
        __syncthreads();
        token = si[0];
        top = 0.0f;
    } else {
        float best_v = NEG_INF;
        int best_i = 0x7fffffff;
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float v = lg[j];
            if (v > best_v || (v == best_v && j < best_i)) { best_v = v; best_i = j; }
        }
        block_argmax(best_v, best_i, sv, si, top, token);
        if (best != nullptr && threadIdx.x == 0) best[m] = 0ull;
    }
    if (temperature > 0.0f) {
        const float inv_t = 1.0f / temperature;
        const float mx = top * inv_t;
        unsigned int floor_key = 0;
        if (top_k > 0 && top_k < V)
            floor_key = radix_threshold(lg, V, inv_t, 0u, (unsigned long long)top_k, CountWeight{}, hist, word);
        if (top_p > 0.0f && top_p < 1.0f) {
            MassWeight mw{lg, inv_t, mx};
            unsigned long long total = 0;
            for (int j = threadIdx.x; j < V; j += blockDim.x)
                if (float_key(lg[j] * inv_t) >= floor_key) total += mw(j, 0u);
            // integer block sum through the histogram's first slot
            if (threadIdx.x == 0) hist[0] = 0;
            __syncthreads();
            atomicAdd(hist, total);
            __syncthreads();
            total = hist[0];
            __syncthreads();
            unsigned long long target = (unsigned long long)((double)top_p * (double)total);
            if (target < 1) target = 1;
            floor_key = radix_threshold(lg, V, inv_t, floor_key, target, mw, hist, word);
        }
        float gv = NEG_INF;
        int gi = 0x7fffffff;
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float z = lg[j] * inv_t;
            if (float_key(z) < floor_key) continue;
            const float v = z - logf(-logf(rng_uniform(seed, (unsigned int)step, (unsigned int)m, (unsigned int)j)));
            if (v > gv || (v == gv && j < gi)) { gv = v; gi = j; }
        }
        block_argmax(gv, gi, sv, si, top, token);
    }
    if (token < 0 || token >= V) token = 0;   // all-NaN logits: a defined token, not a wild read
    for (int c = threadIdx.x; c < C; c += blockDim.x) x[(size_t)m * C + c] = emb[(size_t)token * C + c];
    if (threadIdx.x == 0) {
        tokens[m] = token;
        history[(size_t)min(step, max_steps - 1) * M + m] = token;
        steps[m] = step + 1;
        if (advance) lens[m] += 1;
    }
}
