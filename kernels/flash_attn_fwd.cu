// Flash attention forward (FlashAttention-2 schedule) on the tensor cores.
// NumPy reference and launcher: llamac/ops/flash_forward.py.
//
//   out[b, i, h] = softmax_j(scale * q[b, i, h] . k[b, j, h / G] + mask) @ v[b, j, h / G]
//   lse[b, h, i] = logsumexp_j(scale * q . k + mask)      (natural log, for the backward)
//
// q (B, Tq, H, D), k and v (B, Tk, Hkv, D), G = H / Hkv; query i sits at absolute position
// i + Tk - Tq. Key j is visible iff (!causal || j <= i + Tk - Tq) and (no segments ||
// seg[b, j] == seg[b, i + Tk - Tq]). Rows of q/k/v are addressed through element strides, so
// views (a KV cache's first Tk rows) need no copy; only the last dimension must be contiguous.
//
// One CTA per (query block of BM = 16 * MT * WARPS rows, head, batch). Each warp owns MT tiles
// of 16 query rows; its Q fragments stay in registers for the whole key loop (or, with
// FLASH_Q_SMEM, are re-read from shared memory to free registers). K and V tiles of BN keys are
// staged in shared memory by cp.async, FA2 order: V_t streams in while S = Q K_t^T and its
// softmax are computed, K_{t+1} while P V_t is. Scores never leave registers: the m16n8k16
// accumulator layout of S is exactly the A-operand layout P needs for P V, after rounding to
// 16 bits. The softmax is online, in base 2 (one FFMA + ex2 per score). Causal CTAs stop at
// the diagonal; masks are applied only on tiles that need them.
// Compile-time shape: HEAD_DIM, FLASH_WARPS, FLASH_MT, FLASH_Q_SMEM, FLASH_BN, FLASH_MIN_BLOCKS
// (llamac.ops.flash_forward.KernelConfig picks them per head size). -DLLAMAC_WGMMA (an sm_90a build, hs 64)
// swaps the two products for Hopper's warpgroup MMA: S = Q K^T with both operands read from
// shared memory, O += P V with P straight from the score registers; everything else is shared.
// Nothing of size Tq x Tk exists anywhere.
//
// No #include (NVRTC on the GPU machine resolves none), so mma / ldmatrix / cp.async are
// inline PTX. Only 16-bit DTYPEs have a tensor-core path; the DTYPE=float build keeps the
// entry point (the compile tests build every kernel for every dtype) and traps, and the
// launcher never calls it.

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef FLASH_WARPS
#define FLASH_WARPS 4
#endif
#ifndef FLASH_MT           // m16 row tiles per warp: 2 reads each K/V fragment once for 32 rows
#define FLASH_MT 1
#endif
#ifndef FLASH_Q_SMEM       // 1: Q fragments re-read from shared memory per tile, not held in registers
#define FLASH_Q_SMEM 0
#endif
#ifndef FLASH_BN           // keys per K/V tile: 32 halves the score registers (room for FLASH_MT=2 at hs=128)
#define FLASH_BN 64
#endif
#ifndef FLASH_STAGES       // 2: double-buffered K/V, one barrier per tile (tile t+1 loads during all of tile t)
#define FLASH_STAGES 1
#endif
#ifndef FLASH_LAZY         // 1: rescale O only when some row max of the warp moved (a warp vote)
#define FLASH_LAZY 0
#endif
#ifdef LLAMAC_WGMMA         // Hopper warpgroup MMA (an sm_90a build) for both products; HEAD_DIM 64
#define FLASH_WGMMA 1
#else
#define FLASH_WGMMA 0
#endif
#ifndef FLASH_MIN_BLOCKS   // CTAs per SM to fit registers for (__launch_bounds__)
#define FLASH_MIN_BLOCKS 1
#endif

namespace flash {

// (an enum: constants the DTYPE=float build never touches raise no unused-variable warnings)
enum : int {
    D = HEAD_DIM,
    WARPS = FLASH_WARPS,
    MT = FLASH_MT,
    Q_SMEM = FLASH_Q_SMEM,
    THREADS = 32 * WARPS,
    BM = 16 * MT * WARPS,  // query rows per CTA
    BN = FLASH_BN,       // keys per tile
    STAGES = FLASH_STAGES,
    LAZY = FLASH_LAZY,
    WGMMA = FLASH_WGMMA,
    CHUNKS = D / 8,      // 16-byte chunks per row
    // Shared-memory row stride in elements. Rows of a multiple of 64 elements (128 bytes) are
    // XOR-swizzled in place; other head sizes (32, 48, 96: 4, 6, 12 chunks) cannot be, since the
    // XOR would move a chunk past the row end, so their rows are padded by one 16-byte chunk
    // instead: D / 8 + 1 chunks is odd, so the 8 rows one ldmatrix phase reads fall in 8
    // different 16-byte bank groups. The pad chunk is never written nor read.
    PAD = D % 64 != 0,
    SD = PAD ? D + 8 : D,
};

static_assert(D % 16 == 0 && D >= 32 && D <= 256,
              "HEAD_DIM must be a multiple of 16 (k of m16n8k16), 32 to 256 (32, 48, 64, 96, 128 are the tested ones)");
static_assert(WARPS == 4 || WARPS == 8, "FLASH_WARPS must be 4 or 8");
static_assert(MT == 1 || MT == 2, "FLASH_MT must be 1 or 2");
static_assert(BN == 32 || BN == 64 || (WGMMA && BN == 128), "FLASH_BN must be 32 or 64 (or 128 with LLAMAC_WGMMA)");
static_assert(!WGMMA || (D == 64 && MT == 1 && STAGES == 2),
              "LLAMAC_WGMMA takes HEAD_DIM 64 (one 128-byte swizzle atom per row), FLASH_MT 1 and FLASH_STAGES 2");
static_assert(STAGES == 1 || STAGES == 2, "FLASH_STAGES must be 1 or 2");

// ------------------------------------------------------------ the 16-bit types' tensor-core ops

template <typename T> struct Mma;

template <> struct Mma<bf16_t> {
    // c (16x8 f32) += a (16x16, row) * b (16x8, col)
    static LLAMAC_DEVICE void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Two floats rounded (nearest even) into one register, lo in the low half.
    static LLAMAC_DEVICE unsigned pack(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

template <> struct Mma<half_t> {
    static LLAMAC_DEVICE void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static LLAMAC_DEVICE unsigned pack(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// ------------------------------------------------------------ shared memory and async copies

LLAMAC_DEVICE unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; with valid == false the
// 16 bytes are zero-filled (src-size 0), so rows past the end need no separate store.
LLAMAC_DEVICE void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}

LLAMAC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N> LLAMAC_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

LLAMAC_DEVICE void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

LLAMAC_DEVICE void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// With LLAMAC_WGMMA (common.cuh's warpgroup MMA), warp w % 4 of a warpgroup owns rows
// 16 (w % 4) .. +15 of the group's 64 and its accumulators are laid out like mma.sync's m16n8
// tiles side by side: the FLASH_MT = 1 ownership and register layout, so masking, softmax and
// the epilogue are shared. The 64-wide Q/K/V rows (128 bytes) with chunk c at c ^ (row % 8)
// are the 128-byte swizzle layout as they stand, given tiles that start on 1024 bytes.

LLAMAC_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

LLAMAC_DEVICE float ex2(float x) {  // 2^x; ex2.approx(-inf) = +0, which the masking relies on
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Element offset of 16-byte chunk c of row r in a tile of D-wide rows. Rows of 128 or 256
// bytes unswizzled would put the 8 rows an ldmatrix phase reads on the same 4 banks;
// XOR-ing the chunk index with r % 8 spreads them over all 32. Padded rows (PAD) need no XOR.
LLAMAC_DEVICE int swz(int r, int c) { return PAD ? r * SD + (c << 3) : r * D + ((c ^ (r & 7)) << 3); }

// ldmatrix addresses for fragment (row block rb of 16 rows, column block kb of 16) when lane
// reads row rb*16 + lrow and chunk 2*kb + lc (lrow % 8 == lane % 8). Since the XOR touches only
// the chunk's low 3 bits and 16 * rb rows keep r % 8, the address is one of four per-lane
// offsets (kb % 4) plus a compile-time constant: 4 registers per operand instead of one per
// fragment, which is what lets 32 accumulator rows per warp fit. (Padded rows are linear, so
// the same split holds trivially: chunk 2 kb + lc = 2 (kb % 4) + lc + 8 (kb / 4).)
struct FragAddr {
    unsigned off[4];
    LLAMAC_DEVICE FragAddr(unsigned base, int lrow, int lc) {
#pragma unroll
        for (int j = 0; j < 4; ++j) off[j] = base + 2u * swz(lrow, 2 * j + lc);
    }
    // byte address; rb and kb must be compile-time constants after unrolling
    LLAMAC_DEVICE unsigned at(int rb, int kb) const { return off[kb & 3] + 2u * (rb * 16 * SD + (kb >> 2) * 64); }
};

// rows [row0, row0 + ROWS) of a (T, D) slab with row stride `stride` into a swizzled tile;
// rows at or past `limit` are zero-filled (and read row 0, which is always in bounds).
template <int ROWS, typename T>
LLAMAC_DEVICE void load_tile(T* tile, const T* src, long long stride, int row0, int limit) {
    constexpr int N = ROWS * CHUNKS;   // (a multiple of THREADS for D 64 and 128: no bounds test)
#pragma unroll
    for (int it = 0; it < (N + THREADS - 1) / THREADS; ++it) {
        const int i = threadIdx.x + it * THREADS;
        if (N % THREADS != 0 && i >= N) break;
        const int r = i / CHUNKS, c = i % CHUNKS;
        const bool valid = row0 + r < limit;
        cp_async16(tile + swz(r, c), src + (valid ? (long long)(row0 + r) * stride : 0) + c * 8, valid);
    }
}

// ------------------------------------------------------------ one key tile's masking and online softmax
// Thread rows: m tile mt, r = 0 and 1 for lane / 4 and lane / 4 + 8 of its 16 -> score entries
// [mt][.][2r], [mt][.][2r + 1]; row (mt, r) sits at absolute position qpos0 + 16 mt + 8 r.

// Scores a row may not see -> -inf: a key past Tk, a causal future key, another document.
LLAMAC_DEVICE void mask_scores(float (&s)[MT][BN / 8][4], int kbase, int qpos0, int Tk, int causal,
                               const int* sb, int lane) {
    // Each row's document id is re-read here (L1 hits) rather than kept in registers.
    // Rows past Tq are computed (and dropped): clamp so their read stays in bounds.
    int qseg[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) qseg[mt][r] = sb ? sb[min(qpos0 + 16 * mt + 8 * r, Tk - 1)] : 0;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int j = kbase + nt * 8 + (lane % 4) * 2 + e;
            const int kseg = (sb && j < Tk) ? sb[j] : 0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const bool visible = j < Tk && (!causal || j <= qpos0 + 16 * mt + 8 * r) && (!sb || kseg == qseg[mt][r]);
                    if (!visible) s[mt][nt][2 * r + e] = neg_inf();
                }
            }
        }
    }
}

// Online softmax, base 2: s becomes p = 2^(scale log2e s - m) with the updated row max m;
// alpha = 2^(m_old - m) is the factor the output so far must be rescaled by.
LLAMAC_DEVICE void softmax_tile(float (&s)[MT][BN / 8][4], float (&m_run)[MT][2], float (&l_run)[MT][2],
                                float (&alpha)[MT][2], float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_run[mt][r];
            if constexpr (LAZY) {
                // max(s) * c == max(s * c) exactly (rounding is monotonic): one multiply per row
                float raw = s[mt][0][2 * r];
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) raw = fmaxf(raw, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, raw * scale_log2);
            } else {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]) * scale_log2);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row with every key so far masked keeps m = -inf; subtracting 0 instead keeps
            // 2^(-inf - m) = 0 rather than NaN.
            const float m_use = mx == neg_inf() ? 0.0f : mx;
            alpha[mt][r] = ex2(m_run[mt][r] - m_use);
            m_run[mt][r] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[mt][nt][2 * r] = ex2(fmaf(s[mt][nt][2 * r], scale_log2, -m_use));
                s[mt][nt][2 * r + 1] = ex2(fmaf(s[mt][nt][2 * r + 1], scale_log2, -m_use));
                sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
            }
            l_run[mt][r] = l_run[mt][r] * alpha[mt][r] + sum;
        }
    }
}

// o *= alpha per row. Once the row maxima settle, alpha is exactly 2^0 = 1 for every row of the
// warp and the D/4 multiplies per row can be skipped (LAZY; the vote is warp-uniform).
LLAMAC_DEVICE void rescale_output(float (&o)[MT][D / 8][4], const float (&alpha)[MT][2]) {
    if constexpr (LAZY) {
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) moved |= alpha[mt][0] != 1.0f || alpha[mt][1] != 1.0f;
        if (!__any_sync(0xffffffffu, moved)) return;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[mt][dt][2 * r] *= alpha[mt][r];
                o[mt][dt][2 * r + 1] *= alpha[mt][r];
            }
}

// ------------------------------------------------------------ the kernel body

template <typename T>
LLAMAC_DEVICE void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ out, float* __restrict__ lse, const int* __restrict__ seg,
                           int H, int G, int Tq, int Tk,
                           long long qsb, long long qst, long long qsh,
                           long long ksb, long long kst, long long ksh,
                           long long vsb, long long vst, long long vsh,
                           float scale_log2, int causal) {
    // 1024-byte alignment: the 128-byte swizzle pattern wgmma reads repeats every 8 rows (1 KB).
    extern __shared__ __align__(1024) unsigned char smem_bytes[];
    T* sQ = reinterpret_cast<T*>(smem_bytes);   // (BM, SD), later the output staging area
    T* sK = sQ + BM * SD;                        // (STAGES, BN, SD)
    T* sV = sK + STAGES * BN * SD;               // (STAGES, BN, SD)

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / G;
    // The longest causal rows first (blockIdx.y 0 = last query block), so the short ones fill
    // the tail of the grid instead of leaving one long CTA running alone at the end.
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int off = Tk - Tq;                     // absolute position of query row 0
    const int warp_row = warp * 16 * MT;         // this warp's first row in the CTA

    const T* qb = q + b * qsb + h * qsh;
    const T* kb = k + b * ksb + kvh * ksh;
    const T* vb = v + b * vsb + kvh * vsh;
    const int* sb = seg ? seg + (long long)b * Tk : nullptr;

    const int kv_end = causal ? min(Tk, q0 + BM + off) : Tk;
    const int n_tiles = (kv_end + BN - 1) / BN;

    load_tile<BM>(sQ, qb, qst, q0, Tq);
    cp_async_commit();
    load_tile<BN>(sK, kb, kst, 0, Tk);
    if constexpr (STAGES == 2) load_tile<BN>(sV, vb, vst, 0, Tk);
    cp_async_commit();
    cp_async_wait<1>();                          // Q landed (K_0 may still be in flight)
    __syncthreads();

    // This warp's query rows as m16n8k16 A fragments ([m tile][16 columns of D]), held in
    // registers for the whole key loop, or (Q_SMEM) re-read from sQ for each tile.
    const FragAddr qaddr(smem_addr(sQ + warp_row * SD), lane % 16, lane / 16);
    const FragAddr kaddr(smem_addr(sK), (lane % 8) + (lane / 16) * 8, (lane / 8) % 2);
    const FragAddr vaddr(smem_addr(sV), (lane % 8) + ((lane / 8) % 2) * 8, lane / 16);
    unsigned qf[Q_SMEM || WGMMA ? 1 : MT][Q_SMEM || WGMMA ? 1 : D / 16][4];
    if constexpr (!Q_SMEM && !WGMMA) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[mt][kk], qaddr.at(mt, kk));
    }

    // Thread rows: m tile mt, r0 = lane / 4 and r0 + 8 of its 16 -> index [mt][.][0..1] and [mt][.][2..3].
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    float m_run[MT][2], l_run[MT][2];   // running max of scale log2(e) s; this thread's share of the sum
    // absolute position of this thread's row (mt, r) is qpos0 + 16 mt + 8 r
    const int qpos0 = q0 + warp_row + lane / 4 + off;

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_run[mt][r] = neg_inf();
            l_run[mt][r] = 0.0f;
        }
    }

#if FLASH_WGMMA
    // This warpgroup's Q rows; tile starts are multiples of 8 KB, so every descriptor start is
    // on the 1024-byte grid plus the 32-byte step to each 16 columns of D.
    const int wg_row = (warp / 4) * 64;
    const unsigned long long q_desc = smem_desc(smem_addr(sQ + wg_row * SD));
    const unsigned long long k_desc = smem_desc(smem_addr(sK)), v_desc = smem_desc(smem_addr(sV));
#endif

    for (int t = 0; t < n_tiles; ++t) {
        const int kbase = t * BN;
        unsigned stage_bytes = 0;                // byte offset of tile t's K/V buffers
        if constexpr (STAGES == 1) {
            load_tile<BN>(sV, vb, vst, kbase, Tk);
            cp_async_commit();
            cp_async_wait<1>();                  // K_t landed; V_t may still be in flight
            __syncthreads();
        } else {
            cp_async_wait<0>();                  // K_t, V_t landed
#if FLASH_WGMMA
            fence_proxy_async();                 // ... and are visible to the tensor cores' reads
#endif
            __syncthreads();                     // ... for every thread; and all of tile t-1 is done
            if (t + 1 < n_tiles) {
                const int nxt = ((t + 1) & 1) * BN * SD;
                load_tile<BN>(sK + nxt, kb, kst, kbase + BN, Tk);
                load_tile<BN>(sV + nxt, vb, vst, kbase + BN, Tk);
            }
            cp_async_commit();
            stage_bytes = (t & 1) * BN * SD * 2;
        }

        // On the causal diagonal a warp whose rows all precede this tile's first key has nothing
        // to add (it still takes part in the barriers).
        // With wgmma the test is per warpgroup: all four warps issue its MMAs together.
        const bool warp_idle = causal && kbase > q0 + off + (WGMMA ? (warp / 4) * 64 + 63 : warp_row + 16 * MT - 1);

        // S = Q K_t^T: (16 MT, BN) per warp; each K fragment feeds MT mma pairs.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#if FLASH_WGMMA
        if (!warp_idle) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)   // 16 columns of D = 32 bytes = 2 descriptor units
                wgmma_ss<T, BN, 0, 0>(s[0], q_desc + 2 * kk, k_desc + (stage_bytes >> 4) + 2 * kk, kk > 0);
            wgmma_commit();
            wgmma_wait_all();
            keep_registers(s[0]);
        }
#else
        if (!warp_idle) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Q_SMEM) {
                    ldsm_x4(qa[mt], qaddr.at(mt, kk));
                } else {
#pragma unroll
                    for (int i = 0; i < 4; ++i) qa[mt][i] = qf[mt][kk][i];
                }
            }
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                unsigned bk[4];   // keys np*16 .. +15, d kk*16 .. +15: two n8 tiles
                ldsm_x4(bk, kaddr.at(np, kk) + stage_bytes);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(s[mt][2 * np], qa[mt], bk[0], bk[1]);
                    Mma<T>::mma(s[mt][2 * np + 1], qa[mt], bk[2], bk[3]);
                }
            }
        }
        }
#endif
        if constexpr (STAGES == 1) {
            __syncthreads();                     // every warp is done with sK
            if (t + 1 < n_tiles) load_tile<BN>(sK, kb, kst, kbase + BN, Tk);
            cp_async_commit();                   // (possibly empty: keeps the group count uniform)
        }

        // Masks, only on tiles that need them: the last partial tile, the causal diagonal, documents.
        const bool diagonal = causal && kbase + BN - 1 > q0 + off;
        if (!warp_idle && (diagonal || kbase + BN > Tk || sb)) mask_scores(s, kbase, qpos0, Tk, causal, sb, lane);
        if (!warp_idle) {
            float alpha[MT][2];
            softmax_tile(s, m_run, l_run, alpha, scale_log2);
            rescale_output(o, alpha);
        }

        if constexpr (STAGES == 1) {
            cp_async_wait<1>();                  // V_t landed; K_{t+1} may still be in flight
            __syncthreads();
        }

        // O += P V_t. P's accumulator fragments for keys 16kk .. 16kk+15 are an A fragment.
#if FLASH_WGMMA
        if (!warp_idle) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const unsigned pa[4] = {Mma<T>::pack(s[0][2 * kk][0], s[0][2 * kk][1]),
                                        Mma<T>::pack(s[0][2 * kk][2], s[0][2 * kk][3]),
                                        Mma<T>::pack(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]),
                                        Mma<T>::pack(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3])};
                // 16 keys of V = 16 rows of 128 bytes = 128 descriptor units
                wgmma_rs<T, D, 1>(o[0], pa, v_desc + (stage_bytes >> 4) + 128 * kk, 1);
            }
            wgmma_commit();
            wgmma_wait_all();
            keep_registers(o[0]);
        }
#else
        if (!warp_idle) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                unsigned bv[4];   // keys kk*16 .. +15, d dp*16 .. +15, transposed: two n8 tiles of d
                ldsm_x4_trans(bv, vaddr.at(kk, dp) + stage_bytes);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(o[mt][2 * dp], pa[mt], bv[0], bv[1]);
                    Mma<T>::mma(o[mt][2 * dp + 1], pa[mt], bv[2], bv[3]);
                }
            }
        }
        }
#endif
        if constexpr (STAGES == 1) __syncthreads();   // every warp is done with sV before V_{t+1} lands
    }

    // Epilogue: finish the row sums across the quad, normalise, write lse, and stage the 16-bit
    // output through this warp's own rows of sQ (only this warp ever reads them) so global
    // stores are 16 bytes wide.
    T* sO = sQ;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const int lr = warp_row + mt * 16 + lane / 4 + 8 * r;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<unsigned*>(sO + swz(lr, dt) + (lane % 4) * 2) =
                    Mma<T>::pack(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
            }
            const int row = q0 + lr;
            if (lane % 4 == 0 && row < Tq) {
                lse[((long long)b * H + h) * Tq + row] =
                    l > 0.0f ? (m_run[mt][r] + __log2f(l)) * 0.6931471805599453f : neg_inf();
            }
        }
    }
    __syncwarp();
    T* ob = out + ((long long)b * Tq * H + h) * D;   // out is (B, Tq, H, D), C-contiguous
#pragma unroll
    for (int i = lane; i < 16 * MT * CHUNKS; i += 32) {
        const int lr = warp_row + i / CHUNKS, c = i % CHUNKS;
        const int row = q0 + lr;
        if (row < Tq) {
            *reinterpret_cast<uint4*>(ob + (long long)row * H * D + c * 8) =
                *reinterpret_cast<const uint4*>(sO + swz(lr, c));
        }
    }
}

template <typename T>
LLAMAC_DEVICE void dispatch(const T* q, const T* k, const T* v, T* out, float* lse, const int* seg,
                            int H, int G, int Tq, int Tk,
                            long long qsb, long long qst, long long qsh,
                            long long ksb, long long kst, long long ksh,
                            long long vsb, long long vst, long long vsh,
                            float scale_log2, int causal) {
    if constexpr (sizeof(T) == 2) {
        forward<T>(q, k, v, out, lse, seg, H, G, Tq, Tk, qsb, qst, qsh, ksb, kst, ksh, vsb, vst, vsh,
                   scale_log2, causal);
    } else {
        __trap();   // no fp32 tensor-core path; llamac/ops/flash_forward.py never launches this build
    }
}

}  // namespace flash

// grid (B * H, ceil(Tq / BM)), block 32 * FLASH_WARPS, dynamic shared memory
// (BM + 2 * STAGES * BN) * SD * sizeof(DTYPE), SD = HEAD_DIM, or HEAD_DIM + 8 unless a multiple of 64. Strides are in elements; segments may be null.
extern "C" __global__ void __launch_bounds__(flash::THREADS, FLASH_MIN_BLOCKS)
flash_attn_forward(const DTYPE* __restrict__ q, const DTYPE* __restrict__ k, const DTYPE* __restrict__ v,
                   DTYPE* __restrict__ out, float* __restrict__ lse, const int* __restrict__ segments,
                   int H, int G, int Tq, int Tk,
                   long long qsb, long long qst, long long qsh,
                   long long ksb, long long kst, long long ksh,
                   long long vsb, long long vst, long long vsh,
                   float scale_log2, int causal) {
    flash::dispatch<DTYPE>(q, k, v, out, lse, segments, H, G, Tq, Tk, qsb, qst, qsh, ksb, kst, ksh,
                           vsb, vst, vsh, scale_log2, causal);
}
