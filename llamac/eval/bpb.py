"""Bits per byte of held-out text: a model's loss on text, independent of its tokenizer.

Each document is encoded without <s> or </s> and scored in lm-evaluation-harness's rolling windows
(`loglik.rolling_pairs`): every token predicted once, the first from <s>. Then

    bpb = (sum of -log p over the document tokens, in nats) / (UTF-8 bytes of the text * ln 2)
        = mean loss per token * tokens / (bytes * ln 2),

which two models with different vocabularies can be compared by (nanochat reports it; the harness
calls it bits_per_byte).
"""
from __future__ import annotations

import math
from pathlib import Path

from llamac.errors import LlamacError
from llamac.eval.loglik import rolling_pairs, score_pairs, total_nats


def document_pairs(tokenizer, texts, max_len: int) -> list:
    return [pair for text in texts for pair in rolling_pairs(tokenizer.encode(text, bos=False),
                                                              tokenizer.bos_id, max_len)]


def bits_per_byte(model, tokenizer, texts, batch_tokens=None, progress=None) -> dict:
    """bpb of the documents `texts`, with the totals it is made of."""
    texts = [t for t in texts if t]
    if not texts:
        raise LlamacError("bits per byte: no text to score")
    pairs = document_pairs(tokenizer, texts, model.config.max_seq_len)
    scores = score_pairs(model, pairs, batch_tokens, progress)
    nats = total_nats(scores)
    tokens = sum(s.n_tokens for s in scores)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bpb": nats / (n_bytes * math.log(2)), "loss": nats / max(tokens, 1), "tokens": tokens,
            "bytes": n_bytes, "documents": len(texts)}


def validation_texts(checkpoint) -> list[str]:
    """The documents a llamac run held out for validation, re-made from the recipe in its checkpoint
    (data.sources, data.val_fraction and seed split them as `llamac pretrain` did)."""
    from llamac.config import recipe_from_dict
    from llamac.train import checkpoint as ckpt_io

    path = Path(checkpoint)
    state = ckpt_io.read_state(path) if (path / ckpt_io.STATE).is_file() else {}
    if "recipe" not in state:
        raise LlamacError(f"bpb: {path} has no run recipe to take the validation split from: "
                          "give the text with bpb:PATH (text files, a folder or JSONL)")
    recipe = recipe_from_dict(state["recipe"])
    base = recipe.sft.from_checkpoint
    if base:       # a chat-tuned model: the held-out text of the model it was tuned from
        if not Path(base).exists():
            raise LlamacError(f"bpb: {path} was chat-tuned from {base}, which is not here to take a validation "
                              "split from: give the text with bpb:PATH")
        return validation_texts(ckpt_io.resolve_checkpoint(base))
    return recipe_validation_texts(recipe, where=f"the recipe in {path}")


def recipe_validation_texts(recipe, where: str = "the recipe") -> list[str]:
    """The documents `llamac pretrain` holds out for validation under this recipe."""
    from llamac.data.pipeline import load_documents, split_documents
    _, val = split_documents(load_documents(recipe.data.sources, recipe.data), recipe.data.val_fraction, recipe.seed)
    if not val:
        raise LlamacError(f"bpb: {where} holds out no validation text (data.val_fraction 0)")
    return [text for _, text in val]


def file_texts(source: str) -> list[str]:
    """The documents of text files, a folder or JSONL (the `text` field), as data.sources reads them."""
    from llamac.data.sources import iter_documents
    texts = [text for _, text in iter_documents([source])]
    if not texts:
        raise LlamacError(f"bpb: {source}: empty (no text to score)")
    return texts
