"""`llamac sft`: instruction tuning with the chat template, loss on assistant tokens only.

Examples are rendered with the chat template, encoded once each, and packed first-fit into rows
of seq_len + 1 tokens with a document (segment) id per example, so no example attends to
another. Targets outside assistant turns, across example boundaries and on padding are -100
(cross_entropy's ignore index): they carry no loss and no gradient.

Over-long examples (more than seq_len + 1 tokens) are cut to their first seq_len + 1 tokens
and counted; an example whose assistant tokens are all cut away is dropped and counted.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llamac.config import Recipe
from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.eval.skills import exact_match
from llamac.infer.chat import JINJA_TEMPLATE, encode_chat

IGNORE = -100


# ---------------------------------------------------------------- data files

def read_sft_file(path: Path) -> list[dict]:
    """Chat examples from a JSONL file: Alpaca rows (instruction, input, output) or chat rows (messages)."""
    from llamac.data.sources import read_json_rows
    return read_json_rows(path, _to_chat, "SFT data file", "examples")


def _to_chat(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise LlamacError(f"{where}: each line must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise LlamacError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LlamacError(f"{where}: each message needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise LlamacError(f"{where}: unknown role {m['role']!r} (system, user or assistant)")
            if not isinstance(m["content"], str):
                raise LlamacError(f"{where}: message content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise LlamacError(f"{where}: no assistant message to learn from")
        return {"messages": messages, "task": row.get("task", "chat")}
    for key in ("instruction", "output"):
        if key not in row:
            raise LlamacError(f"{where}: missing field '{key}' (Alpaca rows need instruction and output; "
                              "chat rows need messages)")
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return {"messages": [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(row["output"])}],
            "task": "alpaca"}


def load_sources(sources: list[str], seed: int):
    """(train examples, held-out skill examples) from the recipe's data.sources."""
    train, heldout = [], []
    for source in sources:
        if source == "builtin:instruct":
            from llamac.data.instruct import builtin_instruct
            t, h = builtin_instruct(seed=seed)
            train += t
            heldout += h
        elif source.startswith("builtin:"):
            raise LlamacError(f"unknown SFT source {source!r} (builtin:instruct, or JSONL files)")
        else:
            path = Path(source)
            files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
            if path.is_dir() and not files:
                raise LlamacError(f"{path}: no .jsonl files")
            for f in files:
                train += read_sft_file(f)
    if not train:
        raise LlamacError("no SFT examples in data.sources")
    return train, heldout


# ---------------------------------------------------------------- packing

@dataclass
class Packed:
    tokens: np.ndarray       # (N, L + 1) int64
    targets_ok: np.ndarray   # (N, L + 1) bool: this position is an assistant token (a loss target)
    segments: np.ndarray     # (N, L + 1) int64: example id within the row, -1 for padding
    truncated: int = 0
    dropped: int = 0
    stats: dict = field(default_factory=dict)


def pack(encoded: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> Packed:
    """Pack (ids, mask) examples into rows of seq_len + 1 tokens, in order, first fit among open rows."""
    L = seq_len + 1
    truncated = dropped = 0
    rows: list[list] = []       # each: [ids, mask, segs]
    for ids, mask in encoded:
        if len(ids) > L:
            ids, mask = ids[:L], mask[:L]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        for row in rows[-16:]:      # first fit among the newest rows: near-full packing in linear time
            if len(row[0]) + len(ids) <= L:
                break
        else:
            row = [[], [], []]
            rows.append(row)
        seg = (row[2][-1] + 1) if row[2] else 0
        row[0] += ids
        row[1] += mask
        row[2] += [seg] * len(ids)
    n = len(rows)
    tokens = np.full((n, L), pad_id, np.int64)
    ok = np.zeros((n, L), bool)
    segments = np.full((n, L), -1, np.int64)
    for i, (ids, mask, segs) in enumerate(rows):
        tokens[i, :len(ids)], ok[i, :len(ids)], segments[i, :len(ids)] = ids, mask, segs
    fill = float((segments >= 0).mean()) if n else 0.0
    return Packed(tokens, ok, segments, truncated, dropped, {"rows": n, "fill": round(fill, 3)})


def batch_arrays(packed: Packed, rows: np.ndarray):
    """(x, y, segments) for the chosen rows: y is -100 off assistant tokens and across examples."""
    t, ok, seg = packed.tokens[rows], packed.targets_ok[rows], packed.segments[rows]
    x, y = t[:, :-1], t[:, 1:].copy()
    keep = ok[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    y[~keep] = IGNORE
    segments = np.where(seg[:, :-1] >= 0, seg[:, :-1], seg.max(initial=0) + 1)  # padding: its own document
    return x, y, segments


# ---------------------------------------------------------------- the command

def check_same_run(out_dir: Path, adapters: dict | None):
    """A run resumes only as the kind of run it is: full fine-tuning, or LoRA with the same
    settings on the same base (by its weights hash)."""
    from llamac.train import checkpoint
    found = checkpoint.latest(out_dir)
    if found is None:
        return
    saved = checkpoint.read_state(found).get("lora")
    keys = ("rank", "alpha", "dropout", "targets", "rslora", "chat_tokens")
    if saved is not None:
        from llamac.train.lora import SETTINGS_BEFORE
        saved = {**SETTINGS_BEFORE, **saved}
    if (saved is None) != (adapters is None):
        kinds = ["full fine-tuning" if a is None else "LoRA" for a in (saved, adapters)]
        raise LlamacError(f"checkpoint {found} is a {kinds[0]} run; the recipe asks for {kinds[1]}: "
                          "use --no-resume or another out_dir")
    differ = [k for k in keys if saved is not None and saved[k] != adapters[k]]
    if differ:
        raise LlamacError(f"checkpoint {found} has LoRA {', '.join(f'{k} {saved[k]}' for k in differ)}; the recipe "
                          f"asks for {', '.join(f'{k} {adapters[k]}' for k in differ)}: use --no-resume or another out_dir")
    if saved is not None and saved["base_hash"] != adapters["base_hash"]:
        raise LlamacError(f"checkpoint {found} was trained on another base ({saved['base']}, weights hash "
                          f"{saved['base_hash'][:19]}...) than sft.from_checkpoint ({adapters['base']}, "
                          f"{adapters['base_hash'][:19]}...): use --no-resume or another out_dir")


def finetune(recipe: Recipe, resume: bool = True) -> dict:
    """`llamac sft`: load the base model, pack the data, evaluate, train, evaluate again. Data
    parallel as `pretrain`: each rank trains its rows of every batch; rank 0 scores and writes."""
    from llamac.dist import world

    if not recipe.sft.from_checkpoint:
        raise LlamacError("sft needs a base model: set sft.from_checkpoint in the recipe or pass --from CHECKPOINT")
    device = backend.resolve_device(recipe.device)
    group = world.init(device)
    with world.failures_end_the_job(group):
        world.check_recipe(recipe, group.world_size)
        return _finetune(recipe, resume, device, group)


def _rank_batch(x, y, s, group):
    """This rank's rows of a global batch, and its loss weight: its share of the batch's loss
    tokens times the world size, so that the ranks' mean of weighted losses (and of gradients)
    is the loss over the whole batch, as in one process."""
    from llamac.dist import world
    rows = world.rows(len(x), group)
    n_all, n_mine = int((y != IGNORE).sum()), int((y[rows] != IGNORE).sum())
    return x[rows], y[rows], s[rows], n_mine * group.world_size / max(n_all, 1)


def _finetune(recipe: Recipe, resume: bool, device: str, group) -> dict:
    from llamac.train.checkpoint import load_model
    from llamac.train.loop import Trainer, log

    model, tokenizer, ckpt = load_model(recipe.sft.from_checkpoint, device=device)
    if tokenizer is None:
        raise LlamacError(f"{ckpt} has no tokenizer.model")
    for token in ("<|user|>", "<|assistant|>", "<|end|>"):
        if tokenizer.piece_to_id(token) == tokenizer.unk_id:
            raise LlamacError(f"the tokenizer of {ckpt} has no {token} token: train it with llamac's reserved tokens")
    recipe = replace(recipe, model=model.config)   # a copy: the caller's recipe is not changed
    from llamac.train.precision import compute_precision
    adapters = None
    if recipe.sft.lora is not None:
        from llamac.train import lora
        lora.check_rank(model, recipe.sft.lora)
        # the base's hash from its float32 weights, before any cast: what loading the checkpoint checks
        adapters = lora.describe(recipe.sft.lora, base=str(Path(ckpt).resolve()),
                                 base_hash=lora.weights_hash(model.state_dict()),
                                 token_ids=lora.chat_token_ids(tokenizer))
    compute_precision(model, recipe, device)
    if adapters is not None:
        lora.apply_lora(model, recipe.sft.lora, adapters["token_ids"], seed=recipe.seed)
        rows = f" and the rows of {len(adapters['token_ids'])} chat tokens" if adapters["token_ids"] else ""
        log(f"LoRA: rank {recipe.sft.lora.rank} on {', '.join(recipe.sft.lora.targets)}{rows}: "
            f"{sum(p.size for p in model.parameters() if p.requires_grad):,} trainable parameters of "
            f"{model.num_params():,}; the base is frozen")
    seq_len = min(recipe.data.seq_len, model.config.max_seq_len)
    train_examples, heldout = load_sources(recipe.data.sources, recipe.seed)
    heldout = heldout[: recipe.sft.eval_tasks]
    rng = random.Random(recipe.seed)
    rng.shuffle(train_examples)
    n_val = max(1, int(len(train_examples) * recipe.data.val_fraction)) if recipe.data.val_fraction else 0
    val_examples, train_examples = train_examples[:n_val], train_examples[n_val:]
    encode = lambda exs: [encode_chat(tokenizer, ex["messages"]) for ex in exs]  # noqa: E731
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    train_packed, val_packed = pack(encode(train_examples), seq_len, pad), pack(encode(val_examples), seq_len, pad)
    log(f"sft: {len(train_examples)} train examples in {train_packed.stats['rows']} rows "
        f"(fill {train_packed.stats['fill']}), {train_packed.truncated} truncated, {train_packed.dropped} dropped; "
        f"{len(val_examples)} validation examples; {len(heldout)} held-out skill tasks")

    B = recipe.train.batch_size
    n_rows = len(train_packed.tokens)

    def batch_fn(step, micro):
        k = step * recipe.train.grad_accum + micro
        epoch, offset = divmod(k * B, n_rows)
        order = np.random.default_rng((recipe.seed, epoch)).permutation(n_rows)
        rows = order[np.arange(offset, offset + B) % n_rows]
        x, y, s = batch_arrays(train_packed, rows)
        if not group.distributed:
            return (backend.to_device(x, device), backend.to_device(y, device), backend.to_device(s, device))
        x, y, s, weight = _rank_batch(x, y, s, group)
        return (backend.to_device(x, device), backend.to_device(y, device), backend.to_device(s, device), weight)

    from llamac.eval.bpb import validation_texts
    from llamac.eval.runner import training_evaluator
    from llamac.train.checkpoint import resolve_checkpoint
    tasks = training_evaluator(recipe, tokenizer, lambda: validation_texts(resolve_checkpoint(ckpt))) \
        if group.is_main else None

    def eval_fn(m):
        losses, weights = [], []
        for start in range(0, len(val_packed.tokens), B):
            rows = np.arange(start, min(start + B, len(val_packed.tokens)))
            rows = np.array_split(rows, group.world_size)[group.rank]    # this rank's part of the batch
            x, y, s = batch_arrays(val_packed, rows)
            n = int((y != IGNORE).sum())
            if n:
                losses.append(float(m(backend.to_device(x, device), backend.to_device(y, device),
                                      segment_ids=backend.to_device(s, device))[1].item()) * n)
                weights.append(n)
        total, count = sum(losses), sum(weights)
        if group.distributed:
            total, count = group.sum_host([total, count])
        return {"val_loss": total / max(count, 1), **(tasks(m) if tasks else {})}

    tokens_per_step = B * recipe.train.grad_accum * seq_len
    extra = {"chat_template": JINJA_TEMPLATE, **({"lora": adapters} if adapters is not None else {})}
    trainer = Trainer(recipe, model, device, batch_fn, eval_fn, tokenizer_path=tokenizer.path,
                      tokens_per_step=tokens_per_step, extra_state=extra, group=group)
    if resume:
        check_same_run(Path(recipe.out_dir), adapters)
    eval_path = Path(recipe.out_dir) / "sft_eval.json"
    if trainer.finished(resume) is not None:
        # A finished run is left as it is on disk: no second scoring, no rewritten sft_eval.json.
        results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
        results["train"] = trainer.run(resume=resume)
        return results
    results = {"truncated": train_packed.truncated, "dropped": train_packed.dropped}
    heldout = heldout if group.is_main else []      # scored by rank 0 alone
    if heldout:
        model.eval()
        before = exact_match(model, tokenizer, heldout)
        log(f"base model: exact match {100 * before['exact_match']:.1f}% on {before['n']} held-out skill tasks, "
            f"{100 * before['ended_turn']:.1f}% ended their turn")
        results["before"] = before
    results["train"] = trainer.run(resume=resume)
    if heldout and not trainer.stopping:
        model.eval()
        after = exact_match(model, tokenizer, heldout)
        log(f"after SFT: exact match {100 * after['exact_match']:.1f}% on {after['n']} held-out skill tasks, "
            f"{100 * after['ended_turn']:.1f}% ended their turn")
        log("per task: " + ", ".join(f"{task} {100 * acc:.0f}%" for task, acc in after["per_task"].items()))
        results["after"] = after
    if group.is_main:
        eval_path.write_text(json.dumps(results, indent=1, default=str))
    return results
