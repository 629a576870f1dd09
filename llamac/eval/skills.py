"""`skills`: exact match on the built-in held-out instruct tasks (builtin:instruct's fixed split).

The model answers each prompt greedily in the chat template until it ends its turn; an answer
counts when it equals the expected one exactly. On the GPU, prompts are answered 16 at a time by
the fast decoder (llamac.infer.decode); elsewhere, one by one with the KV cache.
"""
from __future__ import annotations

from llamac.infer.chat import END_OF_TURN, encode_chat

MAX_NEW_TOKENS = 24


def heldout_skills(seed: int = 1337, limit: int | None = None) -> list[dict]:
    """The held-out skill prompts `builtin:instruct` keeps out of SFT under this seed (sft uses the
    recipe's seed), taken from each task in turn, so the first `limit` cover every task."""
    from llamac.data.instruct import skill_split
    _, heldout = skill_split(seed=seed)
    by_task: dict = {}
    for example in heldout:
        by_task.setdefault(example["task"], []).append(example)
    turns = [ex for group in zip(*by_task.values()) for ex in group]
    turns += [ex for ex in heldout if ex not in turns]
    return turns[:limit] if limit is not None else turns


def greedy_batched(model, prompts: list[list[int]], room: int, stop_ids) -> list | None:
    """[(new tokens, whether a stop id ended them)] of greedy decoding on the GPU decoder, 16 prompts
    at a time; None where the decoder can't take the model or the prompts."""
    from llamac.infer.decode import MAX_BATCH
    from llamac.infer.generate import fast_decoder_for, until_stop
    out = []
    for g in range(0, len(prompts), MAX_BATCH):
        group = prompts[g:g + MAX_BATCH]
        decoder = fast_decoder_for(model, len(group), max(map(len, group)) + room)
        if decoder is None:
            return None
        out += list(zip(*until_stop(decoder.generate(group, room, temperature=0.0), len(group), stop_ids)))
    return out


def _answers_one_by_one(model, prompts: list[list[int]], room: int, end_id: int):
    from llamac.infer.generate import generate_ids
    out = []
    for ids in prompts:
        made, ended = [], False
        for token in generate_ids(model, ids, min(room, model.config.max_seq_len - len(ids)), temperature=0,
                                  eos_id=None, fast=False):
            if token == end_id:
                ended = True
                break
            made.append(token)
        out.append((made, ended))
    return out


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Greedy answers to held-out skill prompts: exact-match accuracy and how many ended their turn."""
    end_id = tokenizer.piece_to_id(END_OF_TURN)
    prompts = [encode_chat(tokenizer, [m for m in ex["messages"] if m["role"] != "assistant"],
                           add_generation_prompt=True)[0] for ex in examples]
    room = max_new_tokens
    fits = all(len(p) + room <= model.config.max_seq_len for p in prompts)
    on_gpu = model.tok_embeddings.weight.device == "cuda"
    answers = greedy_batched(model, prompts, room, {end_id}) if on_gpu and fits and prompts else None
    if answers is None:
        answers = _answers_one_by_one(model, prompts, room, end_id)
    correct = ended = 0
    per_task: dict = {}
    for ex, (made, finished) in zip(examples, answers):
        hit = tokenizer.decode(made).strip() == ex["messages"][-1]["content"]
        correct += hit
        ended += finished
        task = per_task.setdefault(ex["task"], [0, 0])
        task[0] += hit
        task[1] += 1
    n = max(len(examples), 1)
    return {"exact_match": correct / n, "ended_turn": ended / n, "n": len(examples),
            "per_task": {k: round(v[0] / v[1], 3) for k, v in per_task.items()}}
