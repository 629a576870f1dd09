"""Fast decoding on the GPU: one token per step for up to 16 sequences, the step a replayed CUDA graph.

The plain path (model.forward with a KVCache) issues ~20 CuPy ops per layer per token, each
~18 us of Python and launch: at batch 1 that, not the GPU, sets the speed. Here a step is
5 kernels per layer (kernels/decode.cu) plus the LM head and sampling, captured once as a
CUDA graph and replayed per token:

    rmsnorm + QKV GEMV + RoPE + KV-cache write     decode_gemv_qkv
    attention over the filled cache                decode_attention
    o-proj GEMV + residual add                     decode_gemv_resid
    rmsnorm + gate/up GEMV + SwiGLU                decode_gemv_swiglu
    down GEMV + residual add                       decode_gemv_resid
    ... final rmsnorm + LM head                    decode_gemv_logits
    sampling, next input embedding, lengths += 1   decode_sample

Everything a step reads that changes between steps (cache lengths, step counters, the current
tokens) lives in device memory, so the same graph serves every position. Weights are bf16
(fp32 / fp16 models are converted); rounding follows the plain bf16 path op by op (every op's
output rounded to bf16 at the same points), so only the order of fp32 sums differs: greedy output
matched the plain path over all 256 positions of the tiny trained model (tests/gpu/test_decode.py),
though a near-tie between two logits can still flip a token. The prompt is prefilled with the plain path's
own ops (CuPy matmuls) writing straight into the preallocated cache.

Every kernel's NumPy reference is here too (`*_reference`), and `reference_step` is a whole
decode step in NumPy on the same packed weights.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from llamac.engine import backend, launch
from llamac.errors import LlamacError
from llamac.infer.packed import pack_weights
from llamac.ops import attention, flash_forward, rmsnorm, rope, swiglu

# The kernels/*.cu sources this module launches and the extern "C" entry points each must export
# (the NVRTC tests compile every one and check the PTX for them).
SOURCES = {"decode": ("decode_gemv_store", "decode_gemv_resid", "decode_gemv_swiglu", "decode_gemv_logits",
                      "decode_gemv_qkv", "decode_attention", "decode_sample")}   # bf16 only

BF16 = backend.bfloat16
MAX_BATCH = 16            # rows per GEMV (the m16 of the tensor-core mma)
ATTN_CHUNK = 64           # keys per attention block: a short context still spreads over several blocks
ATTN_THREADS = 256
SAMPLE_THREADS = 1024
GEMV_UNROLL = 4           # chunks of a weight row in flight per lane (kernels/decode.cu GEMV_UNROLL)
GEMV_WARPS = (4, 8, 16)   # the block sizes gemv_warps chooses among
GEMV_SHARED_MAX = 227 * 1024   # a Hopper block's shared memory: the norm-fused GEMV holds its M x dim rows there


# ---------------------------------------------------------------- references (NumPy or CuPy arrays)

def _f32(a):
    return a.astype(np.float32)


def rmsnorm_reference(x, w, eps):
    """RMSNorm's reference (llamac.ops.rmsnorm) on decode rows x (M, C), rounded to bf16."""
    return rmsnorm.rmsnorm_forward_reference(x, w, eps)[0].astype(BF16)


def gemv_reference(x, W, norm_w=None, eps=1e-5):
    """bf16(norm?(x) @ W.T), fp32 sums: every decode GEMV before its epilogue. x (M, K), W (N, K) -> (M, N)."""
    if norm_w is not None:
        x = rmsnorm_reference(x, norm_w, eps)
    return (_f32(x) @ _f32(W).T).astype(BF16)


def rope_reference(x, cos, sin):
    """RoPE's reference on one position per row. x (M, n_heads, hs); cos/sin (M, hs/2)."""
    return rope.rope_reference(x[None], cos, sin)[0]


def swiglu_pairs_reference(y):
    """y (M, 2*hidden) with gate/up interleaved -> silu(gate) * up (M, hidden), kernels/swiglu.cu's formula."""
    xp = backend.get_array_module(y)
    return swiglu.swiglu_forward_reference(xp.ascontiguousarray(y[:, 0::2]), xp.ascontiguousarray(y[:, 1::2]))


def decode_attention_reference(q, k_cache, v_cache, lens, extra=1):
    """q (M, H, hs) against the first lens[m] + extra cached keys of row m -> (M, H, hs) bf16.
    Rounds as attention.Attention: q.k to bf16, then scale, softmax in fp32, probabilities to bf16."""
    xp = backend.get_array_module(q)
    M, H, hs = q.shape
    Hkv = k_cache.shape[2]
    G = H // Hkv
    scale = np.float32(1.0 / np.sqrt(hs))
    out = xp.empty(q.shape, BF16)
    for m in range(M):
        T = int(lens[m]) + extra
        k = _f32(k_cache[m, :T]).transpose(1, 2, 0)            # (Hkv, hs, T)
        v = _f32(v_cache[m, :T]).transpose(1, 0, 2)            # (Hkv, T, hs)
        qg = _f32(q[m]).reshape(Hkv, G, hs)
        s = _f32((qg @ k).astype(BF16)) * scale               # (Hkv, G, T)
        s -= s.max(axis=-1, keepdims=True)
        p = xp.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = _f32(p.astype(BF16)) @ v                           # (Hkv, G, hs)
        out[m] = o.reshape(H, hs).astype(BF16)
    return out


_U32, _U64 = np.uint64(0xFFFFFFFF), np.uint64


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values. Every constant is a
    np.uint64, so no promotion rule (NumPy 1's turns uint64 with a Python int into float64) applies."""
    h = h & _U32
    h ^= h >> _U64(16)
    h = (h * _U64(0x85EBCA6B)) & _U32
    h ^= h >> _U64(13)
    h = (h * _U64(0xC2B2AE35)) & _U32
    h ^= h >> _U64(16)
    return h


def rng_uniform_reference(seed: int, step: int, row: int, V: int) -> np.ndarray:
    """decode_sample's counter-based uniforms in (0, 1) for tokens 0..V-1 (float32)."""
    h = _fmix32(np.uint64((seed ^ 0x9E3779B9) & 0xFFFFFFFF))
    h = _fmix32(h ^ np.uint64(step & 0xFFFFFFFF))
    h = _fmix32(h ^ np.uint64(row & 0xFFFFFFFF))
    h = _fmix32(h ^ np.arange(V, dtype=np.uint64))
    return (((h >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)).astype(np.float32)


def float_key(z) -> np.ndarray:
    """Ordered uint32 keys of float32 values (bigger float, bigger key)."""
    u = np.asarray(z, np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u & 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000).astype(np.uint64)


def _threshold(keys, weights, target):
    """Largest key tau with sum(weights[keys >= tau]) >= target (the radix select's answer)."""
    order = np.argsort(-keys.astype(np.int64), kind="stable")
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, target, side="left"))
    return keys[order[min(i, len(order) - 1)]]


def sample_reference(logits, temperature, top_k, top_p, seed, steps):
    """decode_sample on the host: logits (M, V) float32, steps (M,) -> tokens (M,) int."""
    logits = np.asarray(logits, np.float32)
    M, V = logits.shape
    out = np.empty(M, np.int64)
    for m in range(M):
        lg = logits[m]
        if temperature <= 0:
            out[m] = int(np.argmax(lg))
            continue
        inv_t = np.float32(1.0) / np.float32(temperature)
        z = lg * inv_t
        keys = float_key(z)
        floor = np.uint64(0)
        if top_k and 0 < top_k < V:
            floor = _threshold(keys, np.ones(V, np.uint64), top_k)
        if top_p and 0 < top_p < 1:
            mx = lg.max() * inv_t
            mass = (np.exp(z - mx).astype(np.float32) * np.float32(2147483648.0)).astype(np.uint64)
            mass[keys < floor] = 0
            target = max(1, int(float(top_p) * float(int(mass.sum()))))
            floor = _threshold(np.where(keys >= floor, keys, 0), mass, target)
        u = rng_uniform_reference(seed, int(steps[m]), m, V)
        g = z - np.log(-np.log(u))
        g[keys < floor] = -np.inf
        out[m] = int(np.argmax(g))
    return out


def reference_step(layers, extra, cfg, state) -> np.ndarray:
    """One decode step in NumPy on packed weights, the kernels' order and roundings.

    state: dict with x (M, C) bf16 (the new tokens' embeddings), lens (M,), k/v caches (per
    layer (M, max_len, Hkv, hs)), cos/sin tables (max_len, hs/2) bf16. Updates the caches
    and x; returns the logits (M, V) float32 (bf16 values)."""
    H, Hkv, hs = cfg.n_heads, cfg.kv_heads, cfg.head_size
    x, lens = state["x"], np.asarray(state["lens"])
    xp = backend.get_array_module(x)
    M = x.shape[0]
    pos = lens
    cos, sin = state["cos"][xp.asarray(pos)], state["sin"][xp.asarray(pos)]
    for i, L in enumerate(layers):
        y = gemv_reference(x, L.wqkv, L.attn_norm, cfg.norm_eps)
        q = rope_reference(y[:, :H * hs].reshape(M, H, hs), cos, sin)
        k = rope_reference(y[:, H * hs:(H + Hkv) * hs].reshape(M, Hkv, hs), cos, sin)
        v = y[:, (H + Hkv) * hs:].reshape(M, Hkv, hs)
        for m in range(M):
            state["k"][i][m, int(pos[m])] = k[m]
            state["v"][i][m, int(pos[m])] = v[m]
        att = decode_attention_reference(q, state["k"][i], state["v"][i], lens, 1).reshape(M, H * hs)
        x = (_f32(x) + _f32(gemv_reference(att, L.wo))).astype(BF16)
        hid = swiglu_pairs_reference(gemv_reference(x, L.w13, L.ffn_norm, cfg.norm_eps))
        x = (_f32(x) + _f32(gemv_reference(hid, L.w2))).astype(BF16)
    state["x"] = x
    return _f32(gemv_reference(x, extra["head"], extra["norm"], cfg.norm_eps))


# ---------------------------------------------------------------- prefill attention (one hook)

def prefill_attention(q, k, v, mode: str = "auto"):
    """Causal attention for the prompt: q (B, Tq, H, hs), k/v (B, Tk, Hkv, hs) bf16 -> (B, Tq, H, hs).

    mode "flash": llamac.ops.flash_forward.flash_attention_forward; "reference": attention.attention with the
    plain path's own choice of kernel, so prefill logits are bit-identical to model.forward's;
    "auto": the same choice as the plain path (flash where attention.use_flash says so)."""
    if mode == "auto":
        mode = "flash" if attention.use_flash(q, q.shape[-1]) else "reference"
    if mode == "flash":
        out, _ = flash_forward.flash_attention_forward(q, k, v, causal=True)
        return out
    from llamac.engine.tensor import Tensor, no_grad
    with no_grad():
        return attention.attention(Tensor(q), Tensor(k), Tensor(v), causal=True).data


# ---------------------------------------------------------------- the decoder

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_warps(fn, tiles: int, shared: int = 0) -> int:
    """Warps per block of a GEMV of `tiles` tiles of 8 outputs: the fewest (4, 8 or 16) with which the
    blocks the tiles can fill keep about as many warps streaming as the GPU holds. Small blocks win
    where there are tiles enough (a tile's closing reduction stalls only its own block); a small N
    needs fatter blocks to keep enough loads in flight. Depends on N only, never on the batch rows,
    so a row's sums are the same in any batch."""
    most = max(launch.resident_blocks(fn, 32 * w, shared) * w for w in GEMV_WARPS)
    for w in GEMV_WARPS:
        if min(tiles, launch.resident_blocks(fn, 32 * w, shared)) * w >= 0.9 * most:
            return w
    return GEMV_WARPS[-1]


class FastDecoder:
    """Batched decoding of up to 16 sequences on the GPU (kernels/decode.cu) with a CUDA-graph step.

    decoder = FastDecoder(cfg, state_dict, batch=B, max_len=L)    # or FastDecoder.from_model(model, ...)
    for tokens in decoder.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
        ...   # tokens: (B,) int array, one per step
    """

    def __init__(self, cfg, state: dict, batch: int = 1, max_len: int | None = None, prefill: str = "auto"):
        from llamac.model.llama import rope_tables
        cp = backend.cupy_module()
        self.cp, self.cfg = cp, cfg
        if not 1 <= batch <= MAX_BATCH:
            raise LlamacError(f"fast decode takes 1 to {MAX_BATCH} sequences at once, not {batch}")
        self.M = M = self.rows = batch
        if 2 * M * cfg.dim > GEMV_SHARED_MAX:
            raise LlamacError(f"fast decode: {M} rows of dim {cfg.dim} exceed the GEMV's shared memory; "
                              f"decode at most {GEMV_SHARED_MAX // (2 * cfg.dim)} sequences at once")
        self.max_len = L = int(max_len or cfg.max_seq_len)
        hs, H, Hkv = cfg.head_size, cfg.n_heads, cfg.kv_heads
        if hs % 8 or hs > 256 or H % Hkv or cfg.dim % 8 or cfg.ffn_hidden % 8:
            raise LlamacError(f"fast decode needs head_dim, dim and hidden_dim multiples of 8 (head_dim <= 256); "
                              f"got {hs}, {cfg.dim}, {cfg.ffn_hidden}")
        self.G = G = H // Hkv
        if G * (ATTN_CHUNK + 8 * hs) * 4 > 48000:
            raise LlamacError(f"fast decode: {G} query heads per kv head of size {hs} exceed the attention kernel's shared memory")
        self.prefill_mode = prefill
        self.layers, extra = pack_weights(cfg, state, cp)
        self.emb, self.norm = extra["emb"], extra["norm"]
        self.V = cfg.vocab_size
        self.Vp = -(-self.V // 8) * 8           # the head GEMV works in blocks of 8 rows
        head = extra["head"]
        if self.Vp != self.V:
            head = cp.concatenate([head, cp.zeros((self.Vp - self.V, cfg.dim), BF16)])
        self.head = cp.ascontiguousarray(head)
        cos, sin = rope_tables(cfg, hs, 0, L, np, BF16)
        self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)

        # every buffer a step touches, allocated once (a graph replays fixed addresses)
        z = cp.zeros
        self.x = z((M, cfg.dim), BF16)
        self.q = z((M, H * hs), BF16)
        self.att = z((M, H * hs), BF16)
        self.hid = z((M, cfg.ffn_hidden), BF16)
        self.logits = z((M, self.Vp), np.float32)
        self.n_split = -(-L // ATTN_CHUNK)
        self.part = z((M * Hkv, self.n_split, G, hs + 2), np.float32)
        self.counters = z((M * Hkv,), np.int32)
        self.tokens = z((M,), np.int32)
        self.best = z((M,), np.uint64)          # the head's argmax keys, read and zeroed by the sampler
        self.steps = z((M,), np.int32)
        self.lens = z((M,), np.int32)
        self.max_steps = L + 1
        self.history = z((self.max_steps, M), np.int32)
        self.k_cache = [z((M, L, Hkv, hs), BF16) for _ in range(cfg.n_layers)]
        self.v_cache = [z((M, L, Hkv, hs), BF16) for _ in range(cfg.n_layers)]

        opts = (f"-DHEAD_DIM={hs}", f"-DGROUP={G}", f"-DGEMV_UNROLL={GEMV_UNROLL}", f"-DATTN_CHUNK={ATTN_CHUNK}")
        k = lambda name: backend.get_kernel("decode", name, BF16, opts)  # noqa: E731
        self.k_qkv, self.k_resid, self.k_swiglu = k("decode_gemv_qkv"), k("decode_gemv_resid"), k("decode_gemv_swiglu")
        self.k_logits, self.k_attn, self.k_sample = k("decode_gemv_logits"), k("decode_attention"), k("decode_sample")
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._graphs: dict = {}
        self.scale = np.float32(1.0 / np.sqrt(hs))

    @classmethod
    def from_model(cls, model, batch: int = 1, max_len: int | None = None, prefill: str = "auto"):
        return cls(model.config, model.state_dict(), batch, max_len, prefill)

    # ------------------------------------------------------------ launches

    def _gemv(self, fn, x, K, norm_w, W, N, *out):
        null = np.uint64(0)
        # the normalised rows (bf16) for the buffers' full batch, so a row's arithmetic never depends on self.M
        shared = 2 * self.rows * K if norm_w is not None else 0
        warps = gemv_warps(fn, N // 8, shared)
        tiles = N // 8
        per_block = -(-tiles // launch.resident_blocks(fn, 32 * warps, shared))   # a persistent grid, tiles even
        launch.launch(fn, (-(-tiles // per_block),), (32 * warps,),
                       (x, np.int32(self.M), np.int32(K), norm_w if norm_w is not None else null,
                        np.float32(self.cfg.norm_eps), W, np.int32(N), *out), overlap=True, shared=shared)

    def _launch_layers(self):
        cfg, M = self.cfg, self.M
        hs, H, Hkv = cfg.head_size, cfg.n_heads, cfg.kv_heads
        nqkv = (H + 2 * Hkv) * hs
        for i, L in enumerate(self.layers):
            self._gemv(self.k_qkv, self.x, cfg.dim, L.attn_norm, L.wqkv, nqkv, self.q, self.k_cache[i], self.v_cache[i],
                       self.cos, self.sin, self.lens, np.int32(H), np.int32(Hkv), np.int32(self.max_len))
            launch.launch(self.k_attn, (M * Hkv, self.n_split), (ATTN_THREADS,),
                           (self.q, self.k_cache[i], self.v_cache[i], self.lens, np.int32(1), self.att, self.part,
                            self.counters, np.int32(Hkv), np.int32(self.max_len), np.int32(self.n_split),
                            self.scale), overlap=True)
            self._gemv(self.k_resid, self.att, H * hs, None, L.wo, cfg.dim, self.x)
            self._gemv(self.k_swiglu, self.x, cfg.dim, L.ffn_norm, L.w13, 2 * cfg.ffn_hidden, self.hid)
            self._gemv(self.k_resid, self.hid, cfg.ffn_hidden, None, L.w2, cfg.dim, self.x)
        self._gemv(self.k_logits, self.x, cfg.dim, self.norm, self.head, self.Vp, self.logits, self.best,
                   np.int32(self.V))

    def _launch_sample(self, sampling, advance: int):
        """advance 1: after a step's LM head, whose argmax the sampler reads; 0: after a prefill (logits only)."""
        temperature, top_k, top_p, seed = sampling
        launch.launch(self.k_sample, (self.M,), (SAMPLE_THREADS,),
                      (self.logits, np.int32(self.V), np.int32(self.Vp), np.float32(temperature), np.int32(top_k or 0),
                       np.float32(top_p or 0.0), np.uint32(seed & 0xFFFFFFFF), self.tokens, self.history,
                       np.int32(self.max_steps), self.steps, self.lens, np.int32(advance), self.emb,
                       np.int32(self.cfg.dim), self.x, self.best if advance else np.uint64(0)), overlap=True)

    def _graph(self, sampling):
        graph = self._graphs.get(sampling)
        if graph is None:
            with self.stream:
                self.stream.begin_capture()
                try:
                    self._launch_layers()
                    self._launch_sample(sampling, advance=1)
                finally:
                    graph = self.stream.end_capture()
            self._graphs[sampling] = graph
        return graph

    # ------------------------------------------------------------ prefill

    def _prefill_row(self, ids: list[int], row: int):
        """The prompt through the plain path's ops (same matmuls, same roundings), K/V into the cache."""
        from llamac.engine.tensor import Tensor, no_grad
        from llamac.ops.swiglu import swiglu_forward
        cp, cfg = self.cp, self.cfg
        T, hs, H, Hkv = len(ids), cfg.head_size, cfg.n_heads, cfg.kv_heads
        eps = self.cfg.norm_eps

        def norm(x, w):
            with no_grad():
                return rmsnorm.rms_norm(Tensor(x), Tensor(w), eps).data

        x = self.emb[cp.asarray(ids, dtype=np.int64)]                      # (T, C)
        cos, sin = self.cos[:T], self.sin[:T]
        for i, L in enumerate(self.layers):
            h = norm(x, L.attn_norm)
            q = rope.rope_forward((h @ L.wq.T).reshape(1, T, H, hs), cos, sin)
            k = rope.rope_forward((h @ L.wk.T).reshape(1, T, Hkv, hs), cos, sin)
            v = (h @ L.wv.T).reshape(1, T, Hkv, hs)
            self.k_cache[i][row, :T] = k[0]
            self.v_cache[i][row, :T] = v[0]
            y = prefill_attention(q, k, v, self.prefill_mode)              # (1, T, H, hs)
            x = x + y.reshape(T, H * hs) @ L.wo.T
            h = norm(x, L.ffn_norm)
            x = x + swiglu_forward(h @ L.w1.T, h @ L.w3.T) @ L.w2.T
        last = norm(x[-1:], self.norm) @ self.head[:self.V].T               # (1, V)
        self.logits[row, :self.V] = last[0].astype(np.float32)

    def start(self, prompts: list[list[int]], sampling=(0.0, 0, 0.0, 0)):
        """Prefill every row and sample its first token (history row 0). Rows past len(prompts) repeat the last."""
        if not prompts or len(prompts) > self.M:
            raise LlamacError(f"fast decode: give 1 to {self.M} prompts, not {len(prompts)}")
        prompts = list(prompts) + [prompts[-1]] * (self.M - len(prompts))
        for p in prompts:
            if not p:
                raise LlamacError("empty prompt: nothing to condition on")
            if len(p) >= self.max_len:
                raise LlamacError(f"prompt of {len(p)} tokens leaves no room in a cache of {self.max_len}")
            if max(p) >= self.V or min(p) < 0:
                raise LlamacError(f"prompt token id out of range for vocab_size {self.V}")
        with self.stream:
            self.steps.fill(0)
            self.counters.fill(0)
            self.logits.fill(0)
            for row, p in enumerate(prompts):
                self._prefill_row(p, row)
            self.lens.set(np.array([len(p) for p in prompts], np.int32), stream=self.stream)
            self._launch_sample(sampling, advance=0)

    def step(self, sampling=(0.0, 0, 0.0, 0), n: int = 1):
        """n decode steps (graph replays) on the decoder's stream; nothing is synchronised."""
        graph = self._graph(sampling)
        for _ in range(n):
            graph.launch(self.stream)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 top_p=None, seed: int = 0, chunk: int = 8) -> Iterator[np.ndarray]:
        """Yield (len(prompts),) int arrays, one per new token; tokens are read back `chunk` steps at a time."""
        if max_new_tokens < 1:
            return
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise LlamacError(f"prompt ({longest} tokens) + {max_new_tokens} new exceeds the decoder's max_len ({self.max_len})")
        sampling = (float(temperature), int(top_k or 0), float(top_p or 0.0), int(seed))
        n = len(prompts)
        self.start(prompts, sampling)
        done = 0
        made = 1
        size = 1                 # the first token out at once, then bigger chunks
        while done < max_new_tokens:
            want = min(max_new_tokens, done + size)
            if want > made:
                self.step(sampling, want - made)
                made = want
            rows = self.history[done:want].get(stream=self.stream)
            self.stream.synchronize()
            for r in rows:
                yield r[:n].astype(np.int64)
            done = want
            size = min(chunk, size * 2)

    def decode_seconds(self, n: int, sampling=(0.0, 0, 0.0, 0)) -> float:
        """Wall time of n graph replays after start(): the decode loop alone."""
        cp = self.cp
        graph = self._graph(sampling)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(self.stream)
        for _ in range(n):
            graph.launch(self.stream)
        end.record(self.stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3
