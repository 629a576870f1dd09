"""Sampling with a KV cache: greedy, temperature, top-k, top-p; tokens streamed as produced."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from llamac.config import SEED_MAX, Range
from llamac.engine import backend
from llamac.engine.tensor import no_grad
from llamac.errors import LlamacError

# `llamac generate`'s numbers, checked before the model loads; 0 switches top-k off in both
# samplers (sample_next and the GPU decoder), as in llama.cpp.
OPTION_RANGES = {
    "--max-new-tokens": Range(ge=1),
    "--temperature": Range(ge=0, note="0: greedy"),
    "--top-k": Range(ge=0, note="0: off"),
    "--top-p": Range(gt=0, le=1),
    "--seed": Range(ge=0, le=SEED_MAX),
}


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
                rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        cut = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p      # keep the smallest set reaching top_p
        sorted_p[cut] = 0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def fast_decoder_for(model, batch: int = 1, max_len: int | None = None):
    """A llamac.infer.decode.FastDecoder when the model is on the GPU and the fast path takes its shape, else None.
    bf16 models decode as they are; fp32 and fp16 ones are converted to bf16 for it."""
    p = model.tok_embeddings.weight
    if p.device != "cuda" or getattr(model, "lora", None) is not None:
        return None     # LoRA adapters (train.lora) live outside the weights the fast decoder reads
    from llamac.infer.decode import FastDecoder
    try:
        return FastDecoder.from_model(model, batch=batch, max_len=max_len)
    except LlamacError:
        return None     # a shape the kernels don't take: the plain path does it


@no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 eos_id: int | None = None, stop_ids=(), fast: bool | None = None) -> Iterator[int]:
    """Yield new token ids one by one (KV cache: each step feeds only the newest token).
    fast: the GPU decoder (llamac.infer.decode) when None and the model is on CUDA; False: the plain path."""
    limit = model.config.max_seq_len
    if not prompt_ids:
        raise LlamacError("empty prompt: nothing to condition on")
    if len(prompt_ids) + max_new_tokens > limit:
        raise LlamacError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds "
                          f"the model's max_seq_len ({limit})")
    stops = set(stop_ids) | ({eos_id} if eos_id is not None else set())
    decoder = fast_decoder_for(model, 1, len(prompt_ids) + max_new_tokens) if fast is not False else None
    if decoder is not None:
        for row in decoder.generate([list(prompt_ids)], max_new_tokens, temperature, top_k, top_p, seed):
            token = int(row[0])
            if token in stops:
                return
            yield token
        return
    rng = np.random.default_rng(seed)
    model.eval()
    xp = model.tok_embeddings.weight.xp
    cache = model.new_cache(batch=1, max_len=len(prompt_ids) + max_new_tokens)
    logits, _ = model(xp.asarray([prompt_ids], dtype=np.int64), cache=cache)
    for _ in range(max_new_tokens):
        last = backend.to_numpy(logits.data[:, -1]).astype(np.float32)
        token = int(sample_next(last, temperature, top_k, top_p, rng)[0])
        if token in stops:
            return
        yield token
        logits, _ = model(xp.asarray([[token]], dtype=np.int64), cache=cache)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, stream=None,
                  echo_prompt: bool = True) -> str:
    """Generate a continuation of `prompt`; with `stream`, write text as each token arrives."""
    ids = tokenizer.encode(prompt, bos=True)
    produced: list[int] = []
    shown = ""
    if stream is not None and echo_prompt:
        stream.write(prompt)
        stream.flush()
    # Decode prompt and continuation together and keep the new part: decoding the continuation
    # alone would drop its first space (SentencePiece strips a leading "▁" as the dummy prefix).
    base = tokenizer.decode(ids)

    def continuation():
        return tokenizer.decode(ids + produced)[len(base):]

    for token in generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id):
        produced.append(token)
        if stream is not None:
            text = continuation()
            if not text.endswith("\ufffd"):      # a character's byte pieces print once it is complete
                stream.write(text[len(shown):])
                stream.flush()
                shown = text
    text = continuation()
    if stream is not None and len(text) > len(shown):
        stream.write(text[len(shown):])
        stream.flush()
    return text


def until_stop(steps, rows: int, stop_ids) -> tuple[list[list[int]], list[bool]]:
    """Each row's tokens from a batched decoder's steps (one token per row a step) up to its first stop
    id, and whether a stop id ended it; stops reading once every row has stopped."""
    made = [[] for _ in range(rows)]
    ended = [False] * rows
    for row in steps:
        for r, token in enumerate(row.tolist()):
            if not ended[r]:
                if token in stop_ids:
                    ended[r] = True
                else:
                    made[r].append(token)
        if all(ended):
            break
    return made, ended


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                   top_k, top_p, seed: int, out=None) -> bool:
    """Several prompts decoded together on the GPU (16 at a time), each printed when done.
    False (nothing printed) when the fast decoder can't take the model: the caller goes one by one."""
    out = out or sys.stdout
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    for p, i in zip(prompts, ids):
        if len(i) + max_new_tokens > model.config.max_seq_len:
            raise LlamacError(f"prompt {p[:30]!r} ({len(i)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds "
                              f"the model's max_seq_len ({model.config.max_seq_len})")
    from llamac.infer.decode import MAX_BATCH
    stops = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    first = True
    for g0 in range(0, len(prompts), MAX_BATCH):
        group = ids[g0:g0 + MAX_BATCH]
        decoder = fast_decoder_for(model, len(group), max(map(len, group)) + max_new_tokens)
        if decoder is None:
            if first:
                return False
            raise LlamacError("fast decoder unavailable for a later batch")
        first = False
        made, _ = until_stop(decoder.generate(group, max_new_tokens, temperature, top_k, top_p, seed + g0),
                             len(group), stops)
        for r, p_ids in enumerate(group):
            base = tokenizer.decode(p_ids)
            out.write(f"--- [{g0 + r + 1}/{len(prompts)}]\n{prompts[g0 + r]}{tokenizer.decode(p_ids + made[r])[len(base):]}\n")
        out.flush()
    return True


def _read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LlamacError(f"prompt file not found: {path}")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise LlamacError(f"prompt file {path} has no prompts (one per line)")
    return prompts
