"""Random training windows from a token shard, reproducible from (seed, step, micro_step).

A batch is `batch_size` windows of `seq_len + 1` tokens starting anywhere in the shard:
`x` is the first `seq_len` tokens, `y` the same shifted by one. The start positions come
from a random generator seeded with (seed, step, micro_step) alone, so a run resumed at
step 1000 sees exactly the batches it would have seen, whatever happened before.

On the GPU the next batch (the gather from the memory map and the copy to the device)
is made on a background thread while the current step runs.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from llamac.data.shards import read_header, read_shard
from llamac.engine.backend import to_device
from llamac.errors import LlamacError

TRAIN_STREAM, EVAL_STREAM = 0, 1  # separate random streams for training and evaluation batches


class TokenLoader:
    def __init__(self, path: str | os.PathLike, seq_len: int, batch_size: int, seed: int,
                 device: str = "cpu", grad_accum: int = 1, prefetch: Optional[bool] = None,
                 rows: Optional[slice] = None):
        if seq_len <= 0 or batch_size <= 0 or grad_accum <= 0:
            raise LlamacError(f"TokenLoader: seq_len, batch_size and grad_accum must be positive "
                              f"(got {seq_len}, {batch_size}, {grad_accum})")
        self.path = str(path)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.device, self.grad_accum = device, int(grad_accum)
        # A data-parallel rank's rows of every batch: the windows are drawn for the whole batch,
        # so any number of ranks sees the same tokens per step, and only these rows are read.
        self.rows = rows if rows is not None else slice(0, self.batch_size)
        self.vocab_size = read_header(path).vocab_size
        self.tokens = read_shard(path)
        if len(self.tokens) < self.seq_len + 1:
            raise LlamacError(f"{path} holds {len(self.tokens)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}: "
                              "use more text (or a larger data.val_fraction for the validation shard) "
                              "or a smaller data.seq_len")
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        # Prefetching pays off where the step runs on the GPU; on the CPU it would compete for cores.
        self._prefetch = (device != "cpu") if prefetch is None else bool(prefetch)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: dict[tuple[int, int], Future] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    # ---------------------------------------------------------------- batches

    def starts(self, step: int, micro_step: int = 0, stream: int = TRAIN_STREAM) -> np.ndarray:
        """Window start positions of one batch: a pure function of (seed, stream, step, micro_step)."""
        rng = np.random.default_rng([self.seed, stream, int(step), int(micro_step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def make_batch(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int64 NumPy arrays of shape (batch, seq_len), for the given window starts."""
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def get_batch(self, step: int, micro_step: int = 0):
        """(x, y) for this step and micro step, on the loader's device."""
        key = (int(step), int(micro_step))
        pending = self._pending.pop(key, None)
        self._drop_stale(key)
        batch = pending.result() if pending is not None else self._prepare(key)
        if self._prefetch:
            self.prefetch(*self._next_key(key))
        return batch

    def prefetch(self, step: int, micro_step: int = 0) -> None:
        """Start making the batch for (step, micro_step) on a background thread."""
        key = (int(step), int(micro_step))
        if key in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamac-loader")
        self._pending[key] = self._executor.submit(self._prepare, key)

    def eval_batches(self, n: int) -> list:
        """`n` fixed batches (the same on every call) from a stream apart from training's."""
        batches = []
        for i in range(int(n)):
            x, y = self.make_batch(self.starts(i, 0, stream=EVAL_STREAM))
            batches.append((to_device(x, self.device), to_device(y, self.device)))
        return batches

    def __iter__(self):
        """Batches for step 0, 1, 2, ... (micro steps in order within each step)."""
        step = 0
        while True:
            for micro_step in range(self.grad_accum):
                yield self.get_batch(step, micro_step)
            step += 1

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ---------------------------------------------------------------- internals

    def _prepare(self, key: tuple[int, int]):
        x, y = self.make_batch(self.starts(*key)[self.rows])
        return to_device(x, self.device), to_device(y, self.device)

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        step, micro_step = key
        return (step, micro_step + 1) if micro_step + 1 < self.grad_accum else (step + 1, 0)

    def _drop_stale(self, key: tuple[int, int]) -> None:
        # Batches before this one will not be asked for again (a resumed run jumped past them).
        for other in [k for k in self._pending if k < key]:
            self._pending.pop(other).cancel()
