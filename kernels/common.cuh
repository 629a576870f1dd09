// Shared by every kernel: llamac.backend.kernel_source() pastes this file in
// front of kernels/NAME.cu, and NVRTC compiles the pair with -DDTYPE=<type>.
//
// No #include at all: NVRTC on the GPU machine does not resolve <mma.h>,
// <cuda_bf16.h> or <cuda_fp16.h>, so the 16-bit types are defined here from
// bits. Kernels are written once against DTYPE and compute in fp32:
//     float x = load_f(p + i);   ...   store_f(q + i, y);

#ifndef DTYPE
#error "compile with -DDTYPE=float, -DDTYPE=bf16_t or -DDTYPE=half_t (llamac.backend.kernel_options)"
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
