// Fused multi-tensor AdamW with the global-norm clip. Launcher (FusedAdamW) and reference (AdamW's
// xp path): llamac/train/optim.py.
//
// Every parameter of the model in a few launches, none of which needs the host: a table in
// device memory gives each tensor's pointers, and the per-step numbers (lr, bias corrections,
// clip, ...) sit in a small fp32 array the host refreshes with one host-to-device copy, so the
// launches can be captured in a CUDA graph. DTYPE is the parameters' (and gradients') dtype; a
// bf16/fp16 parameter has an fp32 master copy, updated and then rounded into the parameter in
// place (its address never changes); an fp32 parameter is its own master.
//
//   adamw_sumsq     partial[b] = sum of g^2 over block b's chunks (fixed grid: deterministic)
//   adamw_finalize  norm = sqrt(sum of partials, in order); clip factor into the scalars
//   adamw_update    the update, reading the clip factor from the scalars
//
// Work is cut into chunks of ADAMW_CHUNK elements of one tensor (chunk_tensor/chunk_start,
// built once from the sizes); blocks stride over the chunks.

#define ADAMW_CHUNK 16384
#define ADAMW_TABLE 7  // per tensor: param, grad, master, m, v, size, decays (all 64-bit)

// scalars (fp32): host-written each step ...
#define S_LR 0
#define S_STEP_SIZE 1      // lr / (1 - beta1^t)
#define S_INV_BIAS2 2      // 1 / (1 - beta2^t)
#define S_CLIP 3           // <= 0: no clipping
#define S_WEIGHT_DECAY 4
#define S_BETA1 5
#define S_BETA2 6
#define S_EPS 7
// ... and device-written by adamw_finalize
#define S_SCALE 8          // min(1, clip / (norm + 1e-6)), or 1
#define S_NORM 9

struct AdamWTensor {
    DTYPE* p;
    const DTYPE* g;
    float* master;  // == (float*)p for fp32 parameters
    float* m;
    float* v;
    long long n;
    bool decays;
};

LLAMAC_DEVICE AdamWTensor adamw_tensor(const unsigned long long* table, int i) {
    const unsigned long long* e = table + (long long)i * ADAMW_TABLE;
    AdamWTensor t;
    t.p = reinterpret_cast<DTYPE*>(e[0]);
    t.g = reinterpret_cast<const DTYPE*>(e[1]);
    t.master = reinterpret_cast<float*>(e[2]);
    t.m = reinterpret_cast<float*>(e[3]);
    t.v = reinterpret_cast<float*>(e[4]);
    t.n = (long long)e[5];
    t.decays = e[6] != 0ull;
    return t;
}

// Four consecutive values in one load/store: 16 bytes of fp32, 8 of bf16/fp16.
template <typename T> struct alignas(4 * sizeof(T)) Quad { T v[4]; };

template <typename T> LLAMAC_DEVICE Quad<T> load_quad(T* p) { return *reinterpret_cast<const Quad<T>*>(p); }
template <typename T> LLAMAC_DEVICE void store_quad(T* p, const Quad<T>& x) { *reinterpret_cast<Quad<T>*>(p) = x; }

template <typename T> LLAMAC_DEVICE bool adamw_aligned(const T* p) {
    return (reinterpret_cast<unsigned long long>(p) % (4 * sizeof(T))) == 0;
}

// One parameter: moments, decoupled decay, bias-corrected step (optim.AdamW's formulas).
LLAMAC_DEVICE void adamw_element(float g, float& m, float& v, float& w, float b1, float b2, float inv_bias2,
                                 float eps, float step_size, float decay) {
    m = b1 * m + (1.0f - b1) * g;
    v = b2 * v + (1.0f - b2) * (g * g);
    w = w * decay - step_size * (m / (sqrtf(v * inv_bias2) + eps));
}

LLAMAC_DEVICE float adamw_block_sum(float v, float* shared32) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x == 0) {
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += shared32[w];
    }
    __syncthreads();
    return total;  // meaningful in thread 0 only
}

extern "C" __global__ void adamw_sumsq(const unsigned long long* __restrict__ table,
                                       const int* __restrict__ chunk_tensor,
                                       const long long* __restrict__ chunk_start,
                                       int n_chunks, float* __restrict__ partial) {
    __shared__ float shared32[32];
    float acc = 0.0f;
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWTensor t = adamw_tensor(table, chunk_tensor[c]);
        if (t.g == nullptr) continue;
        const long long lo = chunk_start[c];
        const long long hi = min(lo + ADAMW_CHUNK, t.n);
        long long i = lo;
        if (adamw_aligned(t.g + lo)) {
            for (long long q = lo + 4 * threadIdx.x; q + 4 <= hi; q += 4 * blockDim.x) {
                const Quad<const DTYPE> g = load_quad(t.g + q);
#pragma unroll
                for (int k = 0; k < 4; ++k) { const float f = to_float(g.v[k]); acc += f * f; }
            }
            i = lo + ((hi - lo) & ~3ll);
        }
        for (i += threadIdx.x; i < hi; i += blockDim.x) {
            const float g = load_f(t.g + i);
            acc += g * g;
        }
    }
    const float total = adamw_block_sum(acc, shared32);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// One block. Also writes the norm to norm_out (a fresh device scalar the caller returns).
extern "C" __global__ void adamw_finalize(const float* __restrict__ partial, int n_partial,
                                          float* __restrict__ scalars, float* __restrict__ norm_out) {
    __shared__ float shared32[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n_partial; i += blockDim.x) acc += partial[i];
    const float total = adamw_block_sum(acc, shared32);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(total);
        const float clip = scalars[S_CLIP];
        scalars[S_SCALE] = clip > 0.0f ? fminf(1.0f, clip / (norm + 1e-6f)) : 1.0f;
        scalars[S_NORM] = norm;
        norm_out[0] = norm;
    }
}

extern "C" __global__ void adamw_update(const unsigned long long* __restrict__ table,
                                        const int* __restrict__ chunk_tensor,
                                        const long long* __restrict__ chunk_start,
                                        int n_chunks, const float* __restrict__ scalars) {
    const float lr = scalars[S_LR], step_size = scalars[S_STEP_SIZE], inv_bias2 = scalars[S_INV_BIAS2];
    const float wd = scalars[S_WEIGHT_DECAY], b1 = scalars[S_BETA1], b2 = scalars[S_BETA2];
    const float eps = scalars[S_EPS], scale = scalars[S_SCALE];
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWTensor t = adamw_tensor(table, chunk_tensor[c]);
        if (t.g == nullptr) continue;  // no gradient this step: leave the parameter and moments alone
        const float decay = t.decays ? 1.0f - lr * wd : 1.0f;
        const bool own_master = reinterpret_cast<void*>(t.master) == reinterpret_cast<void*>(t.p);
        const long long lo = chunk_start[c];
        const long long hi = min(lo + ADAMW_CHUNK, t.n);
        long long i = lo;
        // Four elements a thread per step (float4 for the fp32 state, 4 x DTYPE for the parameter
        // and gradient) when every array is aligned at the chunk start; the tail goes one by one.
        if (adamw_aligned(t.g + lo) && adamw_aligned(t.p + lo) && adamw_aligned(t.master + lo) &&
            adamw_aligned(t.m + lo) && adamw_aligned(t.v + lo)) {
            for (long long q = lo + 4 * threadIdx.x; q + 4 <= hi; q += 4 * blockDim.x) {
                const Quad<const DTYPE> g = load_quad(t.g + q);
                Quad<float> m = load_quad(t.m + q), v = load_quad(t.v + q), w = load_quad(t.master + q);
                Quad<DTYPE> p;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    adamw_element(to_float(g.v[k]) * scale, m.v[k], v.v[k], w.v[k], b1, b2, inv_bias2, eps, step_size, decay);
                    p.v[k] = from_float<DTYPE>(w.v[k]);
                }
                store_quad(t.m + q, m);
                store_quad(t.v + q, v);
                store_quad(t.master + q, w);
                if (!own_master) store_quad(t.p + q, p);
            }
            i = lo + ((hi - lo) & ~3ll);
        }
        for (i += threadIdx.x; i < hi; i += blockDim.x) {
            float m = t.m[i], v = t.v[i], w = t.master[i];
            adamw_element(load_f(t.g + i) * scale, m, v, w, b1, b2, inv_bias2, eps, step_size, decay);
            t.m[i] = m;
            t.v[i] = v;
            t.master[i] = w;
            if (!own_master) store_f(t.p + i, w);
        }
    }
}
