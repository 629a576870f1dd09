"""The scheduler's decode steps: a fixed set of slots, each with its own position and KV cache length.

    stepper.prefill(slot, ids) -> logits (V,)     the prompt into the slot's cache at once
    stepper.begin(slot, ids)                      or an empty slot, the prompt then fed one token per step
                                                  (prompts of at most stepper.feed_max tokens)
    h = stepper.launch(inputs, want_logits)       one token for every live slot; inputs {slot: token or None}
    argmax, logits = stepper.collect(h)           {slot: argmax id}, {slot: logits (V,)} for want_logits
    stepper.release(slot)

An input of None means "the argmax of this slot's last step (or of its prefill)", which the stepper
feeds itself.

Batch invariance: a sequence's arithmetic never depends on the other rows. Every step computes all
`slots` rows, live or not, so each projection is one GEMM of the same (slots, K) shape whatever the
number of requests (a GEMM's row i is a function of row i alone for a given shape: its blocking and
its split over threads depend on the shape only); attention runs row by row over that row's own
cache length; prefill runs each prompt alone. tests/test_serve_scheduler.py checks the logits bit
for bit.
"""
from __future__ import annotations

import numpy as np

from llamac.engine import backend
from llamac.engine.tensor import Tensor, no_grad
from llamac.errors import LlamacError
from llamac.ops import attention, rope


class PlainStepper:
    """The model's own modules on NumPy or CuPy, batched over the slots."""

    pipelined = False
    depth = 1                 # steps in flight at once: each is read before the next is launched
    feeds_argmax = True
    feed_max = 0              # prompts are prefilled: one forward costs about what one batched step does

    def __init__(self, model, slots: int, max_len: int | None = None):
        from llamac.model.llama import rope_tables
        cfg = model.config
        self.model, self.cfg, self.slots = model, cfg, int(slots)
        self.max_len = int(max_len or cfg.max_seq_len)
        p = model.tok_embeddings.weight
        self.xp, dtype = p.xp, p.dtype
        shape = (self.slots, self.max_len, cfg.kv_heads, cfg.head_size)
        self.k = [self.xp.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        self.v = [self.xp.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        table_dtype = np.float32 if dtype == np.float64 else dtype
        cos, sin = rope_tables(cfg, cfg.head_size, 0, self.max_len, self.xp, table_dtype)
        if dtype == np.float64:
            cos, sin = cos.astype(np.float64), sin.astype(np.float64)
        self.cos, self.sin = cos, sin
        self.lens = np.zeros(self.slots, np.int64)
        self.last = np.zeros(self.slots, np.int64)        # each slot's argmax of its last step
        model.eval()

    @no_grad()
    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        T = len(ids)
        self._check(ids)
        cache = self.model.new_cache(batch=1, max_len=T)
        logits, _ = self.model(self.xp.asarray([ids], dtype=np.int64), cache=cache)
        for i in range(self.cfg.n_layers):
            self.k[i][slot, :T] = cache.k[i][0]
            self.v[i][slot, :T] = cache.v[i][0]
        self.lens[slot] = T
        row = backend.to_numpy(logits.data[0, -1]).astype(np.float32)
        self.last[slot] = int(np.argmax(row))
        return row

    def begin(self, slot: int, ids: list[int]):
        self._check(ids)
        self.lens[slot] = 0

    def _check(self, ids):
        if not 0 < len(ids) < self.max_len:
            raise LlamacError(f"prompt of {len(ids)} tokens does not fit a context of {self.max_len}")

    def release(self, slot: int):
        self.lens[slot] = 0

    @no_grad()
    def launch(self, inputs: dict, want_logits=()):
        m, cfg, xp = self.model, self.cfg, self.xp
        S, H, Hkv, hs = self.slots, cfg.n_heads, cfg.kv_heads, cfg.head_size
        live = sorted(inputs)
        ids = np.zeros(S, np.int64)
        for s in live:
            ids[s] = self.last[s] if inputs[s] is None else inputs[s]
            if self.lens[s] >= self.max_len:
                raise LlamacError(f"slot {s} is full ({self.max_len} positions)")
        pos = self.lens.copy()
        rows, every = xp.asarray(pos), xp.arange(S)
        cos, sin = Tensor(self.cos[rows]), Tensor(self.sin[rows])       # (S, hs/2): one position per row
        x = m.tok_embeddings(Tensor(xp.asarray(ids[:, None])))           # (S, 1, C)
        for i, layer in enumerate(m.layers):
            att = layer.attention
            q, k, v = att.project(layer.attention_norm(x))
            # the slots lie along the time axis here, so each row takes its own position's rotation
            q = rope.rope(q.reshape(1, S, H, hs), cos, sin).data[0]
            k = rope.rope(k.reshape(1, S, Hkv, hs), cos, sin).data[0]
            self.k[i][every, rows] = k
            self.v[i][every, rows] = v.data.reshape(S, Hkv, hs)
            y = xp.zeros((S, 1, H, hs), q.dtype)
            for s in live:
                n = int(pos[s]) + 1
                y[s] = attention.attention(Tensor(q[None, s:s + 1]), Tensor(self.k[i][s:s + 1, :n]),
                                           Tensor(self.v[i][s:s + 1, :n])).data[0]
            x = x + att.wo(Tensor(y.reshape(S, 1, H * hs)))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        head = m.tok_embeddings.weight if m.output is None else m.output.weight
        logits, _ = m.head(m.norm(x), head)
        logits = backend.to_numpy(logits.data[:, 0]).astype(np.float32)   # (S, V)
        for s in live:
            self.lens[s] += 1
            self.last[s] = int(np.argmax(logits[s]))
        return {s: int(self.last[s]) for s in live}, {s: logits[s] for s in want_logits}

    def collect(self, handle):
        return handle


class FastStepper:
    """The GPU decoder (llamac.infer.decode.FastDecoder), groups of 16 rows, each group's step a CUDA
    graph over its rows up to the highest live one (the scheduler fills the lowest free slot first). The
    graph samples greedily on the device and feeds each row its argmax, so a greedy request needs the
    host only to read its token back; a sampled one's token is drawn on the host from its logits row and
    written into the next step's input."""

    pipelined = True
    # Steps in flight at once while every request is greedy. Two (one launched ahead) idle the GPU whenever
    # the engine thread waits longer than a step for the GIL, which the event loop thread holds while it
    # writes a token's event: at 110M a step is 0.43 ms. Four absorb that; the cost is a stop token's
    # request computing up to three steps more in its row (nothing for the others), and the tokens' pinned
    # buffers below.
    depth = 4
    feeds_argmax = True
    # Prompts up to this long go through the shared decode steps, a token per step, instead of a prefill:
    # a prefill is ~20 launches per layer from the host (about 14 ms at 110M, whatever the prompt's
    # length up to a few hundred tokens), and it stalls every other row while it runs.
    feed_max = 64
    RESET_EVERY = 64          # steps between resets of idle rows' cache lengths (they grow each step)

    def __init__(self, cfg, state: dict, slots: int, max_len: int | None = None):
        """cfg: the model's ModelConfig; state: its state dict (llamac names), on any device."""
        from llamac.infer.decode import MAX_BATCH, FastDecoder
        self.cfg = cfg
        self.slots = int(slots)
        self.max_len = int(max_len or self.cfg.max_seq_len)
        self.rows = MAX_BATCH
        n_groups = -(-self.slots // self.rows)
        # every group has all 16 rows: the same kernels, whatever the number of slots
        self.groups = [FastDecoder(self.cfg, state, batch=self.rows, max_len=self.max_len) for _ in range(n_groups)]
        self.cp = self.groups[0].cp
        # one stream for every group: a step is read back after a single wait, and each group's graphs
        # (memory-bound GEMVs that fill the GPU on their own) run one after the other anyway
        self.stream = self.groups[0].stream
        for g in self.groups[1:]:
            g.stream = self.stream
        self.V = self.cfg.vocab_size
        self.greedy = (0.0, 0, 0.0, 0)
        self.live = [set() for _ in self.groups]
        self._launches = 0
        # each step in flight copies its tokens to its own pinned buffer
        self._host = [[self._pinned(self.rows) for _ in self.groups] for _ in range(self.depth)]
        self.graphs = [self._graphs_by_rows(g) for g in self.groups]   # captured now, not under a request

    def _graphs_by_rows(self, dec) -> dict:
        """{m: the step's graph over the group's first m rows}. A row's arithmetic is the same whatever m
        (tests/gpu/test_decode.py: rows of a batch equal the same prompts alone), so a step costs what the
        highest live row needs: one request alone runs at the batch-1 decoder's speed."""
        full, cached = dec.M, dec._graphs
        graphs = {}
        try:
            for m in range(1, full + 1):
                dec.M, dec._graphs = m, {}       # FastDecoder launches over dec.M rows of its full-size buffers
                graphs[m] = dec._graph(self.greedy)
        finally:
            dec.M, dec._graphs = full, cached
        return graphs

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None):
        """A FastStepper when the GPU decoder takes the model, else None."""
        if model.tok_embeddings.weight.device != "cuda":
            return None
        try:
            return cls(model.config, model.state_dict(), slots, max_len)
        except LlamacError:
            return None

    def _pinned(self, n: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(n * 4)
        return np.frombuffer(mem, np.int32, n)

    def _where(self, slot: int):
        return self.groups[slot // self.rows], slot % self.rows

    def _check(self, ids):
        if not 0 < len(ids) < self.max_len:
            raise LlamacError(f"prompt of {len(ids)} tokens does not fit a context of {self.max_len}")
        if max(ids) >= self.V or min(ids) < 0:
            raise LlamacError(f"prompt token id out of range for vocab_size {self.V}")

    def begin(self, slot: int, ids: list[int]):
        self._check(ids)
        dec, row = self._where(slot)
        with dec.stream:
            dec.lens[row] = 0
            dec.steps[row] = 0
        self.live[slot // self.rows].add(row)

    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        dec, row = self._where(slot)
        self._check(ids)
        with dec.stream:
            dec._prefill_row(list(ids), row)
            dec.lens[row] = len(ids)
            dec.steps[row] = 0
            logits = dec.logits[row, :self.V].get(stream=dec.stream)
            dec.x[row] = dec.emb[int(np.argmax(logits))]      # as the graph feeds its argmax after a step
        self.live[slot // self.rows].add(row)
        return logits

    def release(self, slot: int):
        dec, row = self._where(slot)
        self.live[slot // self.rows].discard(row)
        with dec.stream:
            dec.lens[row] = 0

    def launch(self, inputs: dict, want_logits=()):
        cp = self.cp
        ring = self._launches % self.depth       # the scheduler has at most `depth` steps in flight
        self._launches += 1
        launched = []
        for gi, dec in enumerate(self.groups):
            mine = {s % self.rows: t for s, t in inputs.items() if s // self.rows == gi}
            if not mine:
                continue
            with dec.stream:
                fixed = [(r, t) for r, t in mine.items() if t is not None]
                if fixed:
                    rows = cp.asarray([r for r, _ in fixed], dtype=np.int64)
                    dec.x[rows] = dec.emb[cp.asarray([t for _, t in fixed], dtype=np.int64)]
                if self._launches % self.RESET_EVERY == 0:
                    idle = [r for r in range(self.rows) if r not in self.live[gi]]
                    if idle:
                        dec.lens[cp.asarray(idle, dtype=np.int64)] = 0
            self.graphs[gi][max(mine) + 1].launch(self.stream)
            host = self._host[ring][gi]
            dec.tokens.get(stream=self.stream, out=host, blocking=False)
            launched.append((gi, host))
        return launched, self.stream.record(), set(inputs), set(want_logits)

    def collect(self, handle):
        launched, done, slots, want = handle
        done.synchronize()
        argmax, logits = {}, {}
        for gi, host in launched:
            base = gi * self.rows
            for s in slots:
                if s // self.rows == gi:
                    argmax[s] = int(host[s - base])
            rows = sorted(s - base for s in want if s // self.rows == gi)
            if rows:
                dec = self.groups[gi]
                got = dec.logits[self.cp.asarray(rows, dtype=np.int64), :self.V].get(stream=dec.stream)
                logits.update({base + r: got[j] for j, r in enumerate(rows)})
        return argmax, logits


def make_stepper(model, slots: int, max_len: int | None = None):
    """The GPU decoder's stepper where it takes the model, else the plain path's."""
    return FastStepper.for_model(model, slots, max_len) or PlainStepper(model, slots, max_len)
