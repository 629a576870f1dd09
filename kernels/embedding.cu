// Embedding backward, deterministic: dW[v, :] = sum of dout[j, :] over the positions j with
// ids[j] == v, always added in the same order. NumPy reference and launcher: llamac/ops/embedding.py
// (embedding_backward).
//
// Float atomics would make dW depend on thread timing. Instead the launcher sorts, on the device
// (no host sync), the keys id * N + position: all distinct, so any sort gives the same order, and
// equal ids come out in position order. This kernel gives one block to each position of the
// sorted list; the block at the start of a run of equal ids sums that run's rows in sorted order,
// in fp32, and writes the row of dW once. Ids outside [0, V) are skipped (the launcher maps them
// to V so that they sort last). The other
// blocks return at once. Rows of dW whose id never occurs are left as the caller zeroed them.
// Columns are spread over the block's threads, 16-byte packs when C and the pointers allow.

extern "C" __global__ void embedding_backward(const long long* __restrict__ keys,        // (N,) sorted
                                              const DTYPE* __restrict__ dout,            // (N, C)
                                              DTYPE* __restrict__ dweight,               // (V, C)
                                              long long N, int C, long long V) {
    constexpr int P = Packed128<DTYPE>::size;
    const bool vec = (C % P) == 0 && is_aligned16(dout) && is_aligned16(dweight);
    for (long long s = blockIdx.x; s < N; s += gridDim.x) {
        const long long id = keys[s] / N;
        if ((s > 0 && keys[s - 1] / N == id) || id < 0 || id >= V) continue;  // not a run start
        long long end = s + 1;
        while (end < N && keys[end] / N == id) ++end;
        DTYPE* dst = dweight + id * C;
        if (vec) {
            for (int c = threadIdx.x * P; c < C; c += blockDim.x * P) {
                float acc[P];
#pragma unroll
                for (int k = 0; k < P; ++k) acc[k] = 0.0f;
                for (long long j = s; j < end; ++j) {
                    const Packed128<DTYPE> d = load128(dout + (keys[j] % N) * C + c);
#pragma unroll
                    for (int k = 0; k < P; ++k) acc[k] += to_float(d.v[k]);
                }
                Packed128<DTYPE> o;
#pragma unroll
                for (int k = 0; k < P; ++k) o.v[k] = from_float<DTYPE>(acc[k]);
                store128(dst + c, o);
            }
        } else {
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float acc = 0.0f;
                for (long long j = s; j < end; ++j) acc += load_f(dout + (keys[j] % N) * C + c);
                store_f(dst + c, acc);
            }
        }
    }
}
