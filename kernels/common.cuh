// Shared by every kernel: llamac.engine.backend.kernel_source() pastes this file in
// front of kernels/NAME.cu, and NVRTC compiles the pair with -DDTYPE=<type>.
//
// No #include at all: NVRTC on the GPU machine does not resolve <mma.h>,
// <cuda_bf16.h> or <cuda_fp16.h>, so the 16-bit types are defined here from
// bits. Kernels are written once against DTYPE and compute in fp32:
//     float x = load_f(p + i);   ...   store_f(q + i, y);

#ifndef DTYPE
#error "compile with -DDTYPE=float, -DDTYPE=bf16_t or -DDTYPE=half_t (llamac.engine.backend.kernel_options)"
#endif

#define LLAMAC_DEVICE __device__ __forceinline__

// ------------------------------------------------------------ 16-bit storage types
// Plain structs of one unsigned short: trivially copyable, 2-byte size and
// alignment, so a device buffer of ml_dtypes.bfloat16 / numpy.float16 maps
// onto an array of them. Arithmetic is never done on them, only conversion.

struct bf16_t { unsigned short bits; };
struct half_t { unsigned short bits; };

LLAMAC_DEVICE float to_float(float x) { return x; }

// bf16 is the top half of an fp32, so widening is exact.
LLAMAC_DEVICE float to_float(bf16_t x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

// PTX conversion instead of __half2float, which lives in <cuda_fp16.h>.
LLAMAC_DEVICE float to_float(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> LLAMAC_DEVICE T from_float(float f);

template <> LLAMAC_DEVICE float from_float<float>(float f) { return f; }

// Round to nearest, ties to even, done on the bits: adding 0x7fff plus the
// lowest kept bit carries into the kept half exactly when the dropped half is
// above the midpoint, or at it with an odd kept half; a carry out of the
// mantissa bumps the exponent, which also turns the largest finite values into
// inf as IEEE rounding does. NaN is handled first because the carry could turn
// a NaN with only low payload bits into inf; it stays a quiet NaN of the same
// sign (what ml_dtypes produces).
template <> LLAMAC_DEVICE bf16_t from_float<bf16_t>(float f) {
    unsigned int u = __float_as_uint(f);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}

// cvt.rn is IEEE round-to-nearest-even, with overflow to inf, NaN kept NaN
// and fp16 subnormals produced (no .ftz).
template <> LLAMAC_DEVICE half_t from_float<half_t>(float f) {
    half_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

// ------------------------------------------------------------ scalar access

template <typename T> LLAMAC_DEVICE float load_f(const T* p) { return to_float(*p); }
template <typename T> LLAMAC_DEVICE void store_f(T* p, float x) { *p = from_float<T>(x); }

// ------------------------------------------------------------ 128-bit access
// One 16-byte load or store per thread (ld.global.v4.u32) moves 4 floats or
// 8 bf16/fp16 values; memory-bound kernels need it to approach DRAM bandwidth
// with 16-bit types. The caller must check alignment (is_aligned16): a
// contiguous array can still start mid-allocation, e.g. x[1:].

template <typename T>
struct alignas(16) Packed128 {
    enum { size = 16 / sizeof(T) };  // an enum, not a static member, so no global symbol is emitted
    T v[size];
};

template <typename T> LLAMAC_DEVICE Packed128<T> load128(const T* p) {
    return *reinterpret_cast<const Packed128<T>*>(p);
}

template <typename T> LLAMAC_DEVICE void store128(T* p, const Packed128<T>& x) {
    *reinterpret_cast<Packed128<T>*>(p) = x;
}

LLAMAC_DEVICE bool is_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ------------------------------------------------------------ indexing
// 64-bit from the start: blockIdx.x * blockDim.x overflows 32 bits past 2^31
// elements, and n is a long long everywhere.

LLAMAC_DEVICE long long global_thread_id() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

LLAMAC_DEVICE long long grid_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// ------------------------------------------------------------ math

// exp(-|x|) never overflows, so sigmoid is finite and in [0, 1] for every
// finite x (1 / (1 + exp(-x)) would compute exp(+large) = inf for x << 0).
LLAMAC_DEVICE float sigmoidf_safe(float x) {
    float z = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + z) : z / (1.0f + z);
}

// ------------------------------------------------------------ Hopper warpgroup MMA (-DLLAMAC_WGMMA)
// Only in sm_90a builds (llamac.engine.backend.get_kernel(arch="sm_90a")): the plain sm_90 target has no
// wgmma. A warpgroup (4 consecutive warps, the first a multiple of 4) computes a 64 x N tile:
// warp w % 4 owns rows 16 (w % 4) .. +15, its accumulators laid out like mma.sync's m16n8 tiles
// side by side (d[j][0..1] row lane / 4, columns 8j + 2 (lane % 4) + {0, 1}; d[j][2..3] row + 8).
// Operands in shared memory are read through descriptors; tiles use the 128-byte swizzle:
// 64 16-bit values a row, 16-byte chunk c of row r stored at chunk c ^ (r % 8), tiles starting
// on 1024 bytes. K-major operands step along k by 32 bytes (2 descriptor units) inside a row;
// MN-major ones (rows of k, N or M contiguous, transposed with TRANS_A / TRANS_B) by 16 rows.
#ifdef LLAMAC_WGMMA
// Groups of 8 rows sit 1024 bytes apart, along the rows of a K-major operand and along the k
// rows of an MN-major one; both offset fields say so, whichever the hardware reads for a layout.
LLAMAC_DEVICE unsigned long long smem_desc(unsigned smem_byte_address) {
    return (1ull << 62) | (64ull << 32) | (64ull << 16) | ((smem_byte_address & 0x3ffffu) >> 4);
}
LLAMAC_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
LLAMAC_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
LLAMAC_DEVICE void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Shared memory written through the generic proxy (stores, cp.async) before wgmma reads it
// through the async proxy: each writing thread fences, then the threads synchronise.
LLAMAC_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Pins accumulators in place around asynchronous MMAs: the compiler may not move or copy
// them between the issue and the wait (CUTLASS's warpgroup_fence_operand).
template <int N> LLAMAC_DEVICE void keep_registers(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j]) :: "memory");
}

template <typename T> struct IsBf16 { enum { value = 0 }; };
template <> struct IsBf16<bf16_t> { enum { value = 1 }; };

#define WGMMA_D64 \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
    "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define WGMMA_SS64(AB) asm volatile( \
    "{ .reg .pred p; setp.ne.b32 p, %34, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32" AB " {" \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
    "}, %32, %33, p, 1, 1, %35, %36; }" \
    : WGMMA_D64 : "l"(a_desc), "l"(b_desc), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B))
#define WGMMA_RS64(AB) asm volatile( \
    "{ .reg .pred p; setp.ne.b32 p, %37, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32" AB " {" \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
    "}, {%32,%33,%34,%35}, %36, p, 1, 1, %38; }" \
    : WGMMA_D64 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d), "n"(TRANS_B))
#define WGMMA_D128 \
    WGMMA_D64, \
    "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
    "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
    "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
    "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define WGMMA_SS128(AB) asm volatile( \
    "{ .reg .pred p; setp.ne.b32 p, %66, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n128k16.f32" AB " {" \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
    "}, %64, %65, p, 1, 1, %67, %68; }" \
    : WGMMA_D128 : "l"(a_desc), "l"(b_desc), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B))
#define WGMMA_RS128(AB) asm volatile( \
    "{ .reg .pred p; setp.ne.b32 p, %69, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n128k16.f32" AB " {" \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
    "}, {%64,%65,%66,%67}, %68, p, 1, 1, %70; }" \
    : WGMMA_D128 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d), "n"(TRANS_B))


// d (64 x N, f32) = (scale_d ? d : 0) + A (64 x 16) B (16 x N), both from shared memory;
// TRANS_A / TRANS_B 1 for an MN-major operand.
template <typename T, int N, int TRANS_A, int TRANS_B>
LLAMAC_DEVICE void wgmma_ss(float (&d)[N / 8][4], unsigned long long a_desc, unsigned long long b_desc, int scale_d) {
    if constexpr (N == 64) {
        if constexpr (IsBf16<T>::value) WGMMA_SS64(".bf16.bf16"); else WGMMA_SS64(".f16.f16");
    } else {
        if constexpr (IsBf16<T>::value) WGMMA_SS128(".bf16.bf16"); else WGMMA_SS128(".f16.f16");
    }
}

// The same with A from registers: this warp's 16 rows as an mma.sync m16n8k16 A fragment.
template <typename T, int N, int TRANS_B>
LLAMAC_DEVICE void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long b_desc, int scale_d) {
    if constexpr (N == 64) {
        if constexpr (IsBf16<T>::value) WGMMA_RS64(".bf16.bf16"); else WGMMA_RS64(".f16.f16");
    } else {
        if constexpr (IsBf16<T>::value) WGMMA_RS128(".bf16.bf16"); else WGMMA_RS128(".f16.f16");
    }
}
#endif
