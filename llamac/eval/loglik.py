"""Log-likelihoods of continuations given contexts, many (context, continuation) pairs per forward.

Every evaluation that scores text goes through `score_pairs`: multiple choice, bits per byte and the
lm-evaluation-harness adapter. A pair is token ids; `encode_pair` makes them from text the way
lm-evaluation-harness does for causal models (spaces at the end of the context move to the front of
the continuation; context and context + continuation are encoded with <s>, and the continuation is
the latter's tokens after the former's), so llamac's scores and the harness's agree.

Pairs are sorted by length and packed into right-padded batches of about `batch_tokens` tokens. The
model is causal, so padding after a row's last token changes nothing before it: a pair's score does
not depend on what it is batched with, beyond the order of floating-point sums. Only the positions
that predict continuation tokens go through the LM head, and its log-softmax runs in fp32.
A pair longer than the model's context keeps its last max_seq_len + 1 tokens (the context is cut
from the left, as in the harness); a continuation longer than the context is scored in pieces
(`split_long`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from llamac.engine import backend
from llamac.engine.tensor import Tensor, no_grad
from llamac.errors import LlamacError
from llamac.ops import linear

HEAD_ROWS = 4096            # scored positions per LM-head GEMM: bounds the (rows, vocab) logits in memory
BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}
# On the GPU each new GEMM shape is timed over cuBLASLt's candidates once (engine/cublaslt.py): batch
# widths rounded up to a multiple of 32 and head chunks to one of 512 rows keep the shapes few.
WIDTH_MULTIPLE = {"cpu": 1, "cuda": 32}
HEAD_MULTIPLE = {"cpu": 1, "cuda": 512}


@dataclass(frozen=True)
class Pair:
    context: tuple          # token ids the continuation is conditioned on (at least <s>)
    continuation: tuple     # token ids scored


@dataclass(frozen=True)
class Score:
    logprob: float          # sum of log p(continuation token | everything before it), in nats
    greedy: bool            # every continuation token was the model's argmax
    n_tokens: int


def encode_pair(tokenizer, context: str, continuation: str, special: bool = False) -> Pair:
    """Token ids of (context, continuation) as lm-evaluation-harness makes them for a causal model.
    special: chat tokens written in the text become their ids (a chat-templated prompt)."""
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped):] + continuation
        context = stripped
    if not context:
        return Pair((tokenizer.bos_id,), tuple(tokenizer.encode(continuation, bos=False, special=special)))
    whole = tokenizer.encode(context + continuation, bos=True, special=special)
    context_ids = tokenizer.encode(context, bos=True, special=special)
    return Pair(tuple(context_ids), tuple(whole[len(context_ids):]))


def rolling_pairs(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[Pair]:
    """A long text as pairs whose continuations cover every token once: the first window is
    <s> + its first max_len - 1 tokens predicting max_len tokens, each later one predicts the next
    max_len tokens from the token before them (lm-evaluation-harness's disjoint rolling windows)."""
    tokens = list(tokens)
    pairs, start = [], 0
    while start < len(tokens):
        end = min(start + max_len, len(tokens))
        context = (prefix_id,) if start == 0 else (tokens[start - 1],)
        pairs.append(Pair(context, tuple(tokens[start:end])))
        start = end
    return pairs


def split_long(pair: Pair, max_len: int) -> list[Pair]:
    """A pair whose continuation outgrows the model's context, as pairs of half-context pieces of it,
    each conditioned on everything before it (cut to the context): their log-probabilities sum to
    the whole continuation's (the chain rule, each factor with the context that fits)."""
    n = len(pair.continuation)
    if n <= max_len:
        return [pair]
    step = max(1, max_len // 2)
    whole = pair.context + pair.continuation
    return [Pair(whole[:len(pair.context) + a], pair.continuation[a:a + step]) for a in range(0, n, step)]


def _window(pair: Pair, max_len: int) -> tuple[list[int], int]:
    """(input ids, number of scored positions at the end) of a pair cut to the model's context."""
    if not pair.context:
        raise LlamacError("a pair needs at least one context token (<s> for an empty context)")
    tokens = (list(pair.context) + list(pair.continuation))[-(max_len + 1):]
    return tokens, len(pair.continuation)


def _width(length: int, multiple: int, max_len: int) -> int:
    return min(-(-length // multiple) * multiple, max_len)


def _batches(lengths: list[int], order: list[int], batch_tokens: int, multiple: int, max_len: int):
    """Consecutive runs of `order` (longest first) whose padded size stays within batch_tokens."""
    batch: list[int] = []
    for i in order:
        width = _width(lengths[batch[0]] if batch else lengths[i], multiple, max_len)
        if batch and (len(batch) + 1) * width > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def log_softmax_at(logits, targets):
    """(log p of each row's target, whether it is the row's argmax), computed in fp32."""
    xp = backend.get_array_module(logits)
    z = logits.astype(np.float32)
    top = z.max(axis=-1, keepdims=True)
    lse = xp.log(xp.exp(z - top).sum(axis=-1)) + top[:, 0]
    rows = xp.arange(len(targets))
    picked = z[rows, targets]
    return picked - lse, picked >= top[:, 0]


@dataclass
class Batch:
    """One forward's worth of pairs: right-padded ids and where their continuation tokens are."""
    ids: np.ndarray         # (rows, width) int64
    rows: np.ndarray        # (N,) row of each scored position
    cols: np.ndarray        # (N,) its column: the position whose logits predict the target
    targets: np.ndarray     # (N,) the continuation token predicted there
    pair: np.ndarray        # (N,) index of the pair (in the caller's list) the position belongs to


def plan_batches(pairs: Sequence[Pair], max_len: int, batch_tokens: int, width_multiple: int = 1) -> list[Batch]:
    """The batches score_pairs runs: pieces that fit the context, longest first, about batch_tokens
    each, each batch padded to its longest row rounded up to width_multiple."""
    pieces = [(k, piece) for k, pair in enumerate(pairs) for piece in split_long(pair, max_len)]
    windows = [_window(piece, max_len) for _, piece in pieces]
    lengths = [len(tokens) - 1 for tokens, _ in windows]            # inputs: all but the last token
    order = sorted(range(len(windows)), key=lambda i: (-lengths[i], i))
    batches = []
    for members in _batches(lengths, order, batch_tokens, width_multiple, max_len):
        ids = np.zeros((len(members), _width(lengths[members[0]], width_multiple, max_len)), np.int64)
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(members):
            tokens, n = windows[i]
            ids[r, :lengths[i]] = tokens[:-1]
            rows += [r] * n
            cols += range(lengths[i] - n, lengths[i])
            targets += tokens[len(tokens) - n:]
            owner += [pieces[i][0]] * n
        batches.append(Batch(ids, np.array(rows, np.int64), np.array(cols, np.int64), np.array(targets, np.int64),
                             np.array(owner, np.int64)))
    return batches


def combine(n_pairs: int, batches: Sequence[Batch], results) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair (sum of log-probabilities, every token greedy) from each batch's per-position results."""
    logprob, missed = np.zeros(n_pairs), np.zeros(n_pairs)
    for batch, (lp, greedy) in zip(batches, results):
        if len(batch.pair):
            logprob += np.bincount(batch.pair, weights=lp, minlength=n_pairs)
            missed += np.bincount(batch.pair, weights=~greedy, minlength=n_pairs)
    return logprob, missed == 0


@no_grad()
def score_pairs(model, pairs: Sequence[Pair], batch_tokens: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> list[Score]:
    """The Score of every pair, in the order given. `progress(n)` is told after each batch of n rows."""
    weight = model.head_weight
    xp, device = weight.xp, weight.device
    batches = plan_batches(pairs, model.config.max_seq_len, batch_tokens or BATCH_TOKENS.get(device, 4096),
                           WIDTH_MULTIPLE.get(device, 1))
    results = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            results.append(_score_positions(model, weight, backend.to_device(batch.ids, device), xp.asarray(batch.rows),
                                            xp.asarray(batch.cols), batch.targets, xp))
            if progress is not None:
                progress(len(batch.ids))
    finally:
        model.train(was_training)
    logprob, greedy = combine(len(pairs), batches, results)
    return [Score(float(logprob[k]), bool(greedy[k]), len(pair.continuation)) for k, pair in enumerate(pairs)]


def _score_positions(model, weight, ids, rows, cols, targets, xp):
    """Log-probabilities (float64 NumPy) and greedy flags of `targets` at hidden[rows, cols]."""
    if len(targets) == 0:
        return np.zeros(0), np.zeros(0, bool)
    hidden = model.hidden_states(ids).data                           # (B, T, C)
    multiple = HEAD_MULTIPLE.get(backend.device_of(hidden), 1)
    targets = xp.asarray(np.asarray(targets, np.int64))
    logprobs, greedy = [], []
    for start in range(0, len(targets), HEAD_ROWS):
        n = min(HEAD_ROWS, len(targets) - start)
        padded = _width(n, multiple, HEAD_ROWS)                      # extra rows repeat the first
        take = xp.concatenate([xp.arange(start, start + n), xp.full(padded - n, start)]) if padded > n \
            else xp.arange(start, start + n)
        logits = linear.linear(Tensor(hidden[rows[take], cols[take]]), weight).data
        lp, top = log_softmax_at(logits, targets[take])
        logprobs.append(backend.to_numpy(lp[:n]).astype(np.float64))
        greedy.append(backend.to_numpy(top[:n]))
    return np.concatenate(logprobs), np.concatenate(greedy)


def total_nats(scores: Sequence[Score]) -> float:
    return -math.fsum(s.logprob for s in scores)
