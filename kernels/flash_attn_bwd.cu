// Flash-attention backward (FlashAttention-2 style) on tensor cores.
// NumPy references and the launcher: llamac/ops/flash_backward.py.
//
// Layouts (C-contiguous): q, dout, out (B, Tq, H, hs); k (B, Tk, Hkv, hs);
// lse, D (B, H, Tq) fp32; dq_acc (B, Tq, H, hs) fp32; segments (B, Tk) int32 or null.
// v may be the v part of a packed q|k|v projection (its positions v_row elements apart); dq
// (B, Tq, H, hs) and dk, dv (B, Tk, Hkv, hs) C-contiguous, or the views of one packed q|k|v
// gradient: their positions dq_row and dkv_row elements apart.
// Query i sits at absolute position i + Tk - Tq; key j is visible to it iff
// (!causal || j <= i + Tk - Tq) && (no segments || segments[j] == segments[i + Tk - Tq]).
//
// Three kernels:
//   flash_attn_bwd_preprocess  D = rowsum(dout * out), and zeroes dq_acc (8 values a thread)
//   flash_attn_bwd             one CTA per ((batch, kv head), key block): dK, dV in registers
//                              over all G query heads and query blocks (no atomics), dQ added
//                              into dq_acc with fp32 atomics (bulk adds under wgmma). The grid
//                              runs the first key blocks (under causality the longest: every
//                              later query sees them) of every head before the shorter ones,
//                              so short CTAs fill the tail
//   flash_attn_bwd_convert_dq  dq_acc -> dq in the input dtype
// Given RoPE tables, dK and dQ come back un-rotated (RoPE's backward folded into their stores).
//
// Tensor-core work is mma.sync m16n8k16 (bf16, or f16 for half inputs) with fp32
// accumulators, fed by ldmatrix from padded shared memory; both as inline PTX
// because NVRTC on the device resolves no <mma.h>. DTYPE=float compiles too
// (its tiles are rounded to bf16 on load) so the kernel builds for every dtype
// llamac compiles, but the launcher only takes bf16 and fp16.
//
// The key block is split into 16-key slices, one per warp; a warp computes the
// transposed tiles S^T = K Q^T and dP^T = V dO^T (16 keys x BLOCK_Q queries), so P^T
// and dS^T sit in registers in the accumulator layout, which is exactly the A-operand
// layout of the next mma (dV += P^T dO, dK += dS^T Q): no shared-memory round trip.
// Only dS goes through shared memory, for dQ = dS K, which needs all the block's keys.
// Query tiles are double-buffered with cp.async: tile i+1 streams in while tile i is computed.
//
// -DLLAMAC_WGMMA (an sm_90a build; HEAD_DIM 64, BLOCK_Q 128, NWARPS 8, KEY_TILES 1) runs the
// five products on Hopper's warpgroup MMA (common.cuh), in FlashAttention-3's tile shape: 128 keys
// by 128 queries. Warpgroup w owns keys 64w..64w+63, warp w % 4 the same 16 as above and with the
// same register layout, so the softmax, dS and the dK/dV stores are shared. S^T and dP^T
// (m64n128) read K, V and Q, dO from shared memory (K-major); dV += P^T dO and dK += dS^T Q take
// P^T, dS^T from registers and dO, Q transposed; dQ = dS K is split by queries instead: warpgroup w
// computes queries 64w..64w+63 over all 128 keys, reading dS^T and K transposed, so each dQ value
// is reduced into dq_acc once per 128 keys, not once per 64 (those reductions and the Q/dO loads
// are the kernel's L2 traffic, which bounds it). The reduction leaves from shared memory as bulk
// asynchronous adds (cp.reduce.async.bulk, one 256-byte query row each) instead of per-thread
// atomics. Tiles are stored unpadded in the 128-byte swizzle layout wgmma reads; dS^T as two
// 64-query panels, one per warpgroup's dQ.

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef BLOCK_Q
#define BLOCK_Q 64
#endif

#ifndef NWARPS
#define NWARPS 4
#endif

#ifndef KEY_TILES
#define KEY_TILES 1  // 16-key row tiles per warp: 2 reuses every Q/dO fragment twice (fewer ldmatrix per mma)
#endif

#ifdef LLAMAC_WGMMA
#define BWD_WGMMA 1
#else
#define BWD_WGMMA 0
#endif

#define KPW (KEY_TILES * 16)         // keys per warp
#define BLOCK_K (NWARPS * KPW)       // keys per CTA
#define NTHREADS (NWARPS * 32)

static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM >= 16 && HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 16, at most 256");
static_assert(BLOCK_Q == 32 || BLOCK_Q == 64 || (BWD_WGMMA && BLOCK_Q == 128), "BLOCK_Q must be 32 or 64 (128 with wgmma)");
static_assert(NWARPS == 4 || NWARPS == 8, "NWARPS must be 4 or 8");
static_assert(KEY_TILES == 1 || KEY_TILES == 2, "KEY_TILES must be 1 or 2");
static_assert(!BWD_WGMMA || (HEAD_DIM == 64 && BLOCK_Q == 128 && NWARPS == 8 && KEY_TILES == 1 && sizeof(DTYPE) == 2),
              "LLAMAC_WGMMA takes HEAD_DIM 64, BLOCK_Q 128, NWARPS 8, KEY_TILES 1 and 16-bit inputs");
static_assert(NWARPS % (BLOCK_Q / 16) == 0 && HEAD_DIM % (NWARPS / (BLOCK_Q / 16)) == 0 &&
              (HEAD_DIM / (NWARPS / (BLOCK_Q / 16))) % 8 == 0,
              "the dQ tile must split over the warps in column blocks of 8");

// Shared rows are padded by 16 bytes: a row stride of an odd number of 16-byte
// units puts the 8 rows one ldmatrix reads in 8 different bank groups (HEAD_DIM / 8
// is even for every multiple of 16, so this holds for all head sizes: 48 -> 7 units).
#if BWD_WGMMA
// Unpadded 64-value rows, 16-byte chunk c of row r at chunk c ^ (r % 8): the 128-byte swizzle.
constexpr int LDS = HEAD_DIM;
constexpr int LDP = BLOCK_Q;
LLAMAC_DEVICE int tile_at(int r, int c, int) { return r * 64 + ((((c >> 3) ^ (r & 7)) << 3) | (c & 7)); }
// dS^T (keys x BLOCK_Q queries) as panels of 64 queries, each a swizzled (BLOCK_K, 64) tile.
LLAMAC_DEVICE int ds_at(int r, int c) { return (c >> 6) * (BLOCK_K * 64) + tile_at(r, c & 63, 64); }
constexpr int LDQ = HEAD_DIM + 8;  // fp32 dQ staging rows: 32 bytes of padding spread a warp's rows over the banks
#else
constexpr int LDS = HEAD_DIM + 8;  // q/k/v/dO tiles, 16-bit elements per row
constexpr int LDP = BLOCK_Q + 8;   // dS^T tile
LLAMAC_DEVICE int tile_at(int r, int c, int ld) { return r * ld + c; }
#endif
constexpr float LOG2E = 1.4426950408889634f;

// ------------------------------------------------------------ the 16-bit type the tensor cores see
template <typename T> struct MmaType { typedef bf16_t type; static constexpr bool f16 = false; };
template <> struct MmaType<half_t> { typedef half_t type; static constexpr bool f16 = true; };
typedef MmaType<DTYPE>::type mma_t;

// Two fp32 values rounded (nearest even) into one register of two 16-bit values, lo in the low half.
LLAMAC_DEVICE unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (MmaType<DTYPE>::f16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col).
LLAMAC_DEVICE void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    if constexpr (MmaType<DTYPE>::f16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

LLAMAC_DEVICE unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i.
LLAMAC_DEVICE void ldsm_x4(unsigned* r, const mma_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

LLAMAC_DEVICE void ldsm_x4_t(unsigned* r, const mma_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// Two 8x8 matrices, transposed; lanes 0..15 give the row addresses (the others' are ignored).
LLAMAC_DEVICE void ldsm_x2_t(unsigned* r, const mma_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

// 8 consecutive DTYPE values as 8 mma_t values in 16 bytes (16-byte aligned p).
LLAMAC_DEVICE uint4 load_chunk8(const DTYPE* p) {
    if constexpr (sizeof(DTYPE) == 2) {
        return *reinterpret_cast<const uint4*>(p);
    } else {
        const float4 a = *reinterpret_cast<const float4*>(p);
        const float4 b = *reinterpret_cast<const float4*>(p + 4);
        return make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
    }
}

// ROWS rows of HEAD_DIM values, row r at g + r * row_stride, into s (row stride LDS);
// rows past `valid` are zero so out-of-range queries/keys contribute nothing.
template <int ROWS>
LLAMAC_DEVICE void load_tile(mma_t* s, const DTYPE* g, long long row_stride, int valid) {
    constexpr int CPR = HEAD_DIM / 8;  // 16-byte chunks per row
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
        const int r = c / CPR, col = (c % CPR) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) val = load_chunk8(g + r * row_stride + col);
        *reinterpret_cast<uint4*>(s + tile_at(r, col, LDS)) = val;
    }
}

// cp.async: global -> shared without a register round trip, so the next query tile
// streams in while the tensor cores work on this one. src_bytes 0 zero-fills.
LLAMAC_DEVICE void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

LLAMAC_DEVICE void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

LLAMAC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// dq_acc[0:2] += (a, b) without a return value (sm_90 vector reduction: one L2 op for two floats).
LLAMAC_DEVICE void red_add2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(p), "f"(a), "f"(b) : "memory");
}

template <int N> LLAMAC_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

#if BWD_WGMMA
// dst[0 : bytes / 4] += src (shared memory), asynchronously: one bulk operation of the async proxy,
// done by the L2 in whole lines. Completion is tracked per thread in bulk groups.
LLAMAC_DEVICE void bulk_reduce_add(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 :: "l"(dst), "r"(smem_addr(src)), "r"(bytes) : "memory");
}
LLAMAC_DEVICE void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's bulk groups have read their shared-memory sources (the buffer may be rewritten).
LLAMAC_DEVICE void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// ... and have completed (a CTA must not exit with one in flight).
LLAMAC_DEVICE void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
#endif

// load_tile, asynchronously for 16-bit inputs (fp32 ones are rounded on the way, synchronously).
template <int ROWS>
LLAMAC_DEVICE void load_tile_async(mma_t* s, const DTYPE* g, long long row_stride, int valid) {
    if constexpr (sizeof(DTYPE) == 2) {
        constexpr int CPR = HEAD_DIM / 8;
#pragma unroll
        for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
            const int r = c / CPR, col = (c % CPR) * 8;
            // An invalid row still needs a valid address: row 0 of the tile.
            cp_async16(s + tile_at(r, col, LDS), g + (r < valid ? r : 0) * row_stride + col, r < valid);
        }
    } else {
        load_tile<ROWS>(s, g, row_stride, valid);
    }
}

// ------------------------------------------------------------ RoPE folded into the gradients
// With cos/sin tables (T, HEAD_DIM/2) the kernels hand back the gradients of the inputs *before*
// Meta's interleaved rotation (pairs (2i, 2i+1) by angle t * freq_i): the rotation by -angle,
// which is RoPE's backward, applied as dK and dQ are written, so no separate pass re-reads them.
// The tables are fp32, or DTYPE with -DROPE_TABLE_IN_DTYPE (the model's own bf16 tables,
// widened exactly, as in kernels/rope.cu).
#ifdef ROPE_TABLE_IN_DTYPE
typedef DTYPE rope_table_t;
#else
typedef float rope_table_t;
#endif

// (g0, g1) <- the rotation of (g0, g1) by -angle: the gradient of pair (x0, x1) of the input.
LLAMAC_DEVICE void rope_unrotate(float& g0, float& g1, float c, float s) {
    const float a = g0 * c + g1 * s;
    g1 = g1 * c - g0 * s;
    g0 = a;
}

// ------------------------------------------------------------ D = rowsum(dO * O); dq_acc = 0

// 8 consecutive values (16-byte aligned p) as fp32: one 16-byte load for 16-bit types.
LLAMAC_DEVICE void load8_f(const DTYPE* p, float* f) {
    if constexpr (sizeof(DTYPE) == 2) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const DTYPE* h = reinterpret_cast<const DTYPE*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = to_float(h[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = load_f(p + i);
    }
}

// Each row of HEAD_DIM values belongs to RT consecutive threads (HEAD_DIM / 8 rounded up to a
// power of two), 8 values a thread: 16-byte loads of O and dO, 32-byte stores of zeros.
constexpr int PRE_RT = HEAD_DIM <= 32 ? 4 : HEAD_DIM <= 64 ? 8 : 16;

extern "C" __global__ void flash_attn_bwd_preprocess(const DTYPE* __restrict__ out,
                                                     const DTYPE* __restrict__ dout,
                                                     float* __restrict__ Dsum,
                                                     float* __restrict__ dq_acc,
                                                     int B, int Tq, int H) {
    const long long rows = (long long)B * Tq * H;
    const long long row = global_thread_id() / PRE_RT;  // over (B, Tq, H)
    const int c = (threadIdx.x % PRE_RT) * 8;           // this thread's first column
    float acc = 0.0f;
    if (row < rows && c < HEAD_DIM) {
        const long long base = row * HEAD_DIM + c;
        float o[8], d[8];
        load8_f(out + base, o);
        load8_f(dout + base, d);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(o[i], d[i], acc);
        const float4 z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *reinterpret_cast<float4*>(dq_acc + base) = z;
        *reinterpret_cast<float4*>(dq_acc + base + 4) = z;
    }
    // Rows never straddle a warp (PRE_RT divides 32), and every lane of the warp takes part.
#pragma unroll
    for (int o = PRE_RT / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (row < rows && c == 0) {
        const int h = (int)(row % H);
        const long long bi = row / H;
        const int i = (int)(bi % Tq);
        const long long b = bi / Tq;
        Dsum[(b * H + h) * Tq + i] = acc;
    }
}

// dq = dq_acc in the input dtype, 8 values a thread (32-byte loads, 16-byte stores for 16-bit
// types); with tables, un-rotated (the gradient of q before RoPE; query i at table row i).
// dq's positions are dq_row elements apart (H * HEAD_DIM, or a packed q|k|v gradient's width).
extern "C" __global__ void flash_attn_bwd_convert_dq(const float* __restrict__ dq_acc,
                                                     DTYPE* __restrict__ dq, long long n,
                                                     const rope_table_t* __restrict__ cosv,
                                                     const rope_table_t* __restrict__ sinv,
                                                     int Tq, int H, long long dq_row) {
    const long long row = (long long)H * HEAD_DIM;
    for (long long e = global_thread_id() * 8; e < n; e += grid_stride() * 8) {
        const float4 a = *reinterpret_cast<const float4*>(dq_acc + e);
        const float4 b = *reinterpret_cast<const float4*>(dq_acc + e + 4);
        float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        if (cosv != nullptr) {
            const int t = (int)((e / row) % Tq);
            const long long pair = (long long)t * (HEAD_DIM / 2) + (int)(e % HEAD_DIM) / 2;
#pragma unroll
            for (int k = 0; k < 4; ++k) rope_unrotate(f[2 * k], f[2 * k + 1], load_f(cosv + pair + k), load_f(sinv + pair + k));
        }
        DTYPE* dst = dq + (e / row) * dq_row + e % row;
        if constexpr (sizeof(DTYPE) == 2) {
            Packed128<DTYPE> o;
#pragma unroll
            for (int i = 0; i < 8; ++i) o.v[i] = from_float<DTYPE>(f[i]);
            store128(dst, o);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) store_f(dst + i, f[i]);
        }
    }
}

// ------------------------------------------------------------ the main kernel

extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_attn_bwd(const DTYPE* __restrict__ q, const DTYPE* __restrict__ k, const DTYPE* __restrict__ v,
               const DTYPE* __restrict__ dout, const float* __restrict__ lse,
               const float* __restrict__ Dsum, const int* __restrict__ segments,
               float* __restrict__ dq_acc, DTYPE* __restrict__ dk, DTYPE* __restrict__ dv,
               int Tq, int Tk, int H, int Hkv, int causal, float scale,
               const rope_table_t* __restrict__ cosv, const rope_table_t* __restrict__ sinv,
               long long dkv_row, long long v_row) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];   // (1 KB: the swizzle's period)
    mma_t* sK = reinterpret_cast<mma_t*>(smem_raw);  // (BLOCK_K, LDS)
    mma_t* sV = sK + BLOCK_K * LDS;                   // (BLOCK_K, LDS)
    mma_t* sQ0 = sV + BLOCK_K * LDS;                  // 2 stages of (BLOCK_Q, LDS)
    mma_t* sdO0 = sQ0 + 2 * BLOCK_Q * LDS;            // 2 stages of (BLOCK_Q, LDS)
    mma_t* sdS = sdO0 + 2 * BLOCK_Q * LDS;            // (BLOCK_K, LDP): dS^T, keys x queries
    float* sL0 = reinterpret_cast<float*>(sdS + BLOCK_K * LDP);  // 2 stages of (BLOCK_Q,) lse
    float* sD0 = sL0 + 2 * BLOCK_Q;                               // 2 stages of (BLOCK_Q,) D
    int* sSegQ0 = reinterpret_cast<int*>(sD0 + 2 * BLOCK_Q);      // 2 stages of (BLOCK_Q,)
    int* sSegK = sSegQ0 + 2 * BLOCK_Q;                            // (BLOCK_K,)
#if BWD_WGMMA
    float* sdQ = reinterpret_cast<float*>(sSegK + BLOCK_K);       // (BLOCK_Q, LDQ) fp32 dQ, for the bulk adds
#endif

    const int k0 = blockIdx.y * BLOCK_K, hk = blockIdx.x % Hkv, b = blockIdx.x / Hkv;
    const int G = H / Hkv, off = Tk - Tq;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;  // mma fragment row group and column pair
    const int kw = warp * KPW;              // this warp's first key within the block
    const int kvalid = min(BLOCK_K, Tk - k0);
    const bool seg = segments != nullptr;

    // Causal: query i sees this block only if i + off >= k0, so earlier query blocks are skipped.
    const int qb_first = causal ? max(0, k0 - off) / BLOCK_Q : 0;
    const int nqb = (Tq + BLOCK_Q - 1) / BLOCK_Q;
    const int per_head = nqb - qb_first;
    const int ntiles = G * per_head;  // (query head, query block) pairs, in that order

    // Query tile `it` into stage `st`: q, dO, lse, D and the queries' document ids.
    auto issue_tile = [&](int it, int st) {
        const int h = hk * G + it / per_head;
        const int q0 = (qb_first + it % per_head) * BLOCK_Q;
        const int qvalid = min(BLOCK_Q, Tq - q0);
        const long long q_off = (((long long)b * Tq + q0) * H + h) * HEAD_DIM;
        load_tile_async<BLOCK_Q>(sQ0 + st * BLOCK_Q * LDS, q + q_off, (long long)H * HEAD_DIM, qvalid);
        load_tile_async<BLOCK_Q>(sdO0 + st * BLOCK_Q * LDS, dout + q_off, (long long)H * HEAD_DIM, qvalid);
        for (int i = threadIdx.x; i < BLOCK_Q; i += NTHREADS) {
            const bool ok = i < qvalid;
            const long long r = ((long long)b * H + h) * Tq + q0 + (ok ? i : 0);
            cp_async4(sL0 + st * BLOCK_Q + i, lse + r, ok);   // zero-filled past Tq
            cp_async4(sD0 + st * BLOCK_Q + i, Dsum + r, ok);
            if (seg) cp_async4(sSegQ0 + st * BLOCK_Q + i, segments + (long long)b * Tk + q0 + (ok ? i : 0) + off, ok);
        }
    };

    const long long kv_off = (((long long)b * Tk + k0) * Hkv + hk) * HEAD_DIM;
    load_tile_async<BLOCK_K>(sK, k + kv_off, (long long)Hkv * HEAD_DIM, kvalid);
    load_tile_async<BLOCK_K>(sV, v + ((long long)b * Tk + k0) * v_row + hk * HEAD_DIM, v_row, kvalid);
    if (seg) {
        for (int i = threadIdx.x; i < BLOCK_K; i += NTHREADS)
            sSegK[i] = i < kvalid ? segments[(long long)b * Tk + k0 + i] : 0;
    }
    issue_tile(0, 0);
    cp_async_commit();

    float accK[KEY_TILES][HEAD_DIM / 8][4], accV[KEY_TILES][HEAD_DIM / 8][4];  // this warp's keys x HEAD_DIM
#pragma unroll
    for (int m = 0; m < KEY_TILES; ++m)
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) accK[m][j][e] = accV[m][j][e] = 0.0f;

    for (int it = 0; it < ntiles; ++it) {
        const int st = it & 1;
        const int h = hk * G + it / per_head;
        const int q0 = (qb_first + it % per_head) * BLOCK_Q;
        const int qvalid = min(BLOCK_Q, Tq - q0);
        cp_async_wait<0>();  // this thread's copies of this tile (and, first, of K and V) landed
#if BWD_WGMMA
        fence_proxy_async();  // ... and are visible to the tensor cores' (async proxy) reads
#endif
        // Everyone's copies landed, and every warp is done with the previous tile: its
        // stage (the other one) and sdS are free for the next tile's copies and dS.
        __syncthreads();
        if (it + 1 < ntiles) {
            issue_tile(it + 1, st ^ 1);  // streams in while this tile is computed
            cp_async_commit();
        }
        const mma_t* sQ = sQ0 + st * BLOCK_Q * LDS;
        const mma_t* sdO = sdO0 + st * BLOCK_Q * LDS;
        const float* sL = sL0 + st * BLOCK_Q;
        const float* sD = sD0 + st * BLOCK_Q;
        const int* sSegQ = sSegQ0 + st * BLOCK_Q;

        // S^T = K Q^T and dP^T = V dO^T: KPW keys x BLOCK_Q queries per warp.
        float s[KEY_TILES][BLOCK_Q / 8][4], dp[KEY_TILES][BLOCK_Q / 8][4];
#pragma unroll
        for (int m = 0; m < KEY_TILES; ++m)
#pragma unroll
            for (int j = 0; j < BLOCK_Q / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[m][j][e] = dp[m][j][e] = 0.0f;
#if BWD_WGMMA
        const int wg_keys = (warp / 4) * 64;   // this warpgroup's first key within the block
        const unsigned long long k_desc = smem_desc(smem_addr(sK + wg_keys * LDS));
        const unsigned long long v_desc = smem_desc(smem_addr(sV + wg_keys * LDS));
        const unsigned long long q_desc = smem_desc(smem_addr(sQ)), o_desc = smem_desc(smem_addr(sdO));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk)   // 16 columns = 32 bytes = 2 descriptor units
            wgmma_ss<mma_t, BLOCK_Q, 0, 0>(s[0], k_desc + 2 * kk, q_desc + 2 * kk, kk > 0);
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
            wgmma_ss<mma_t, BLOCK_Q, 0, 0>(dp[0], v_desc + 2 * kk, o_desc + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        keep_registers(s[0]);
        keep_registers(dp[0]);
#else
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            unsigned aK[KEY_TILES][4], aV[KEY_TILES][4];
#pragma unroll
            for (int m = 0; m < KEY_TILES; ++m) {
                ldsm_x4(aK[m], sK + (kw + m * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
                ldsm_x4(aV[m], sV + (kw + m * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
            }
#pragma unroll
            for (int np = 0; np < BLOCK_Q / 16; ++np) {
                unsigned bq[4], bo[4];
                const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
                const int col = kk * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(bq, sQ + row * LDS + col);
                ldsm_x4(bo, sdO + row * LDS + col);
#pragma unroll
                for (int m = 0; m < KEY_TILES; ++m) {
                    mma16816(s[m][2 * np], aK[m], bq[0], bq[1]);
                    mma16816(s[m][2 * np + 1], aK[m], bq[2], bq[3]);
                    mma16816(dp[m][2 * np], aV[m], bo[0], bo[1]);
                    mma16816(dp[m][2 * np + 1], aV[m], bo[2], bo[3]);
                }
            }
        }
#endif

        // P^T = exp(S^T scale - lse), 0 where masked; dS^T = P^T (dP^T - D).
        // Element e of tile (m, j): key kw + 16m + g (+8 for e >= 2), query j*8 + 2t (+1 for odd e).
        const bool need_mask = (causal && k0 + BLOCK_K - 1 > q0 + off) || qvalid < BLOCK_Q ||
                               kvalid < BLOCK_K || seg;
#pragma unroll
        for (int m = 0; m < KEY_TILES; ++m) {
#pragma unroll
            for (int j = 0; j < BLOCK_Q / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = j * 8 + 2 * t + (e & 1);
                    const int kj = kw + m * 16 + g + (e >> 1) * 8;
                    // (this form, not exp2f((s * scale - lse) * LOG2E), leaves the fp16 wgmma build without spills)
                    float p = exp2f(fmaf(s[m][j][e], scale * LOG2E, -sL[qi] * LOG2E));
                    if (need_mask) {
                        const bool visible = qi < qvalid && kj < kvalid &&
                                             (!causal || k0 + kj <= q0 + qi + off) &&
                                             (!seg || sSegK[kj] == sSegQ[qi]);
                        if (!visible) p = 0.0f;  // replaces, so an inf from a masked score never leaks
                    }
                    s[m][j][e] = p;
                    dp[m][j][e] = p * (dp[m][j][e] - sD[qi]);
                }
            }
        }

        // dV += P^T dO, dK += dS^T Q (scaled at the end). The accumulator layout of two
        // adjacent 8-query tiles is the A-operand layout of one 16-query k-step.
#if BWD_WGMMA
        wgmma_fence();
#pragma unroll
        for (int kq = 0; kq < BLOCK_Q / 16; ++kq) {
            const unsigned aP[4] = {pack2(s[0][2 * kq][0], s[0][2 * kq][1]), pack2(s[0][2 * kq][2], s[0][2 * kq][3]),
                                    pack2(s[0][2 * kq + 1][0], s[0][2 * kq + 1][1]), pack2(s[0][2 * kq + 1][2], s[0][2 * kq + 1][3])};
            const unsigned aS[4] = {pack2(dp[0][2 * kq][0], dp[0][2 * kq][1]), pack2(dp[0][2 * kq][2], dp[0][2 * kq][3]),
                                    pack2(dp[0][2 * kq + 1][0], dp[0][2 * kq + 1][1]), pack2(dp[0][2 * kq + 1][2], dp[0][2 * kq + 1][3])};
            // dS^T to shared memory for dQ: rows are keys, columns queries.
            const int r = kw + g, c = kq * 16 + 2 * t;
            *reinterpret_cast<unsigned*>(sdS + ds_at(r, c)) = aS[0];
            *reinterpret_cast<unsigned*>(sdS + ds_at(r + 8, c)) = aS[1];
            *reinterpret_cast<unsigned*>(sdS + ds_at(r, c + 8)) = aS[2];
            *reinterpret_cast<unsigned*>(sdS + ds_at(r + 8, c + 8)) = aS[3];
            // 16 queries of dO / Q = 16 rows of 128 bytes = 128 descriptor units
            wgmma_rs<mma_t, HEAD_DIM, 1>(accV[0], aP, o_desc + 128 * kq, 1);
            wgmma_rs<mma_t, HEAD_DIM, 1>(accK[0], aS, q_desc + 128 * kq, 1);
        }
        wgmma_commit();
        fence_proxy_async();
        __syncthreads();  // both warpgroups' dS^T rows are in shared memory
        {
            // dQ (this warpgroup's 64 queries x HEAD_DIM) += dS K over all BLOCK_K keys.
            const int wg = warp / 4;
            float dq[HEAD_DIM / 8][4];
            const unsigned long long ds_desc = smem_desc(smem_addr(sdS + wg * BLOCK_K * 64));
            const unsigned long long kall_desc = smem_desc(smem_addr(sK));
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BLOCK_K / 16; ++kk)   // 16 keys = 16 rows = 128 units, of dS^T and of K
                wgmma_ss<mma_t, HEAD_DIM, 1, 1>(dq, ds_desc + 128 * kk, kall_desc + 128 * kk, kk > 0);
            wgmma_commit();
            wgmma_wait_all();
            keep_registers(accV[0]);
            keep_registers(accK[0]);
            keep_registers(dq);
            // Staged in shared memory, then each warp adds its own 16 query rows, 256 bytes each,
            // once its previous tile's adds have read them.
            const int row0 = wg * 64 + (warp % 4) * 16;
            bulk_wait_read();
            __syncwarp();
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float* dst = sdQ + (row0 + g + half * 8) * LDQ + 2 * t;
#pragma unroll
                for (int j = 0; j < HEAD_DIM / 8; ++j)
                    *reinterpret_cast<float2*>(dst + j * 8) = make_float2(dq[j][2 * half] * scale, dq[j][2 * half + 1] * scale);
            }
            fence_proxy_async();
            __syncwarp();
            if (lane < 16 && row0 + lane < qvalid)
                bulk_reduce_add(dq_acc + (((long long)b * Tq + q0 + row0 + lane) * H + h) * HEAD_DIM,
                                sdQ + (row0 + lane) * LDQ, HEAD_DIM * 4);
            bulk_commit();
        }
#else
#pragma unroll
        for (int kq = 0; kq < BLOCK_Q / 16; ++kq) {
            unsigned aP[KEY_TILES][4], aS[KEY_TILES][4];
#pragma unroll
            for (int m = 0; m < KEY_TILES; ++m) {
                aP[m][0] = pack2(s[m][2 * kq][0], s[m][2 * kq][1]);
                aP[m][1] = pack2(s[m][2 * kq][2], s[m][2 * kq][3]);
                aP[m][2] = pack2(s[m][2 * kq + 1][0], s[m][2 * kq + 1][1]);
                aP[m][3] = pack2(s[m][2 * kq + 1][2], s[m][2 * kq + 1][3]);
                aS[m][0] = pack2(dp[m][2 * kq][0], dp[m][2 * kq][1]);
                aS[m][1] = pack2(dp[m][2 * kq][2], dp[m][2 * kq][3]);
                aS[m][2] = pack2(dp[m][2 * kq + 1][0], dp[m][2 * kq + 1][1]);
                aS[m][3] = pack2(dp[m][2 * kq + 1][2], dp[m][2 * kq + 1][3]);
                // dS^T to shared memory for dQ: rows are keys, columns queries.
                mma_t* ds = sdS + (kw + m * 16 + g) * LDP + kq * 16 + 2 * t;
                *reinterpret_cast<unsigned*>(ds) = aS[m][0];
                *reinterpret_cast<unsigned*>(ds + 8 * LDP) = aS[m][1];
                *reinterpret_cast<unsigned*>(ds + 8) = aS[m][2];
                *reinterpret_cast<unsigned*>(ds + 8 * LDP + 8) = aS[m][3];
            }
#pragma unroll
            for (int dn = 0; dn < HEAD_DIM / 16; ++dn) {
                unsigned bo[4], bq[4];
                const int row = kq * 16 + (lane & 15);
                const int col = dn * 16 + (lane >> 4) * 8;
                ldsm_x4_t(bo, sdO + row * LDS + col);
                ldsm_x4_t(bq, sQ + row * LDS + col);
#pragma unroll
                for (int m = 0; m < KEY_TILES; ++m) {
                    mma16816(accV[m][2 * dn], aP[m], bo[0], bo[1]);
                    mma16816(accV[m][2 * dn + 1], aP[m], bo[2], bo[3]);
                    mma16816(accK[m][2 * dn], aS[m], bq[0], bq[1]);
                    mma16816(accK[m][2 * dn + 1], aS[m], bq[2], bq[3]);
                }
            }
        }
        __syncthreads();  // all of dS^T is in shared memory

        // dQ (BLOCK_Q x HEAD_DIM) += dS K over this block's keys: warps split the
        // query rows into 16-row tiles and, when there are fewer tiles than warps, the columns.
        // A warp's DN columns are a multiple of 8, not always of 16 (HEAD_DIM 48 over 2 warps:
        // 24): the odd 8 columns take one x2 ldmatrix and one mma.
        constexpr int MT = BLOCK_Q / 16, WN = NWARPS / MT, DN = HEAD_DIM / WN;
        const int m0 = (warp / WN) * 16, n0 = (warp % WN) * DN;
        float dq[DN / 8][4];
#pragma unroll
        for (int j = 0; j < DN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
            unsigned a[4];  // dS (queries x keys) read transposed from dS^T
            ldsm_x4_t(a, sdS + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDP + m0 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int np = 0; np < DN / 16; ++np) {
                unsigned bk[4];
                ldsm_x4_t(bk, sK + (kk * 16 + (lane & 15)) * LDS + n0 + np * 16 + (lane >> 4) * 8);
                mma16816(dq[2 * np], a, bk[0], bk[1]);
                mma16816(dq[2 * np + 1], a, bk[2], bk[3]);
            }
            if constexpr (DN % 16 != 0) {
                unsigned bk[2];
                ldsm_x2_t(bk, sK + (kk * 16 + (lane & 15)) * LDS + n0 + DN - 8);
                mma16816(dq[DN / 8 - 1], a, bk[0], bk[1]);
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int qi = m0 + g + half * 8;
            if (qi < qvalid) {
                float* row = dq_acc + (((long long)b * Tq + q0 + qi) * H + h) * HEAD_DIM + n0 + 2 * t;
#pragma unroll
                for (int j = 0; j < DN / 8; ++j) red_add2(row + j * 8, dq[j][2 * half] * scale, dq[j][2 * half + 1] * scale);
            }
        }
#endif
    }
    cp_async_wait<0>();  // nothing may be left in flight at exit (ntiles is never 0, but cheap)
#if BWD_WGMMA
    bulk_wait();
#endif

    // This CTA owns its keys of dK, dV for the kv head: plain stores.
#pragma unroll
    for (int m = 0; m < KEY_TILES; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int kj = kw + m * 16 + g + half * 8;
            if (kj < kvalid) {
                const long long base = ((long long)b * Tk + k0 + kj) * dkv_row + hk * HEAD_DIM + 2 * t;
#pragma unroll
                for (int j = 0; j < HEAD_DIM / 8; ++j) {
                    float g0 = accK[m][j][2 * half] * scale, g1 = accK[m][j][2 * half + 1] * scale;
                    if (cosv != nullptr) {  // columns j*8 + 2t, +1: pair j*4 + t of key k0 + kj
                        const long long pair = (long long)(k0 + kj) * (HEAD_DIM / 2) + j * 4 + t;
                        rope_unrotate(g0, g1, load_f(cosv + pair), load_f(sinv + pair));
                    }
                    store_f(dk + base + j * 8, g0);
                    store_f(dk + base + j * 8 + 1, g1);
                    store_f(dv + base + j * 8, accV[m][j][2 * half]);
                    store_f(dv + base + j * 8 + 1, accV[m][j][2 * half + 1]);
                }
            }
        }
    }
}
