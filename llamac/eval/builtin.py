"""`next_sentence`: a multiple-choice set made from the built-in corpus, so every install has a benchmark.

The passages are the documents the default recipe holds out for validation (`builtin:classics`
split by `data.val_fraction` 0.01 with seed 1337, as `llamac pretrain` splits it), so a model
trained by the shipped recipes has never seen them. An item is two consecutive sentences of a
passage, the sentence that follows them, a sentence from elsewhere in the same document and two of
about its length from other documents; the model should find the true one most likely. Chance is 25%. The set is the same on
every machine: the split and the draws are seeded.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from llamac.config import DataConfig, Recipe
from llamac.errors import LlamacError
from llamac.eval.choice import Item

N_ITEMS = 500
N_CHOICES = 4
SAME_DOCUMENT = 1           # distractors from the passage's own document; the others from other documents
CONTEXT_SENTENCES = 2
SENTENCE_CHARS = (20, 240)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    """The sentences of a document, line by line: a line without closing punctuation (a title, a
    chapter heading) is no sentence; very short or long ones are left out."""
    out = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line or line[-1] not in ".!?\"'":
            continue
        for sentence in _SENTENCE_END.split(line):
            if SENTENCE_CHARS[0] <= len(sentence) <= SENTENCE_CHARS[1]:
                out.append(sentence)
    return out


def heldout_documents() -> list[tuple[str, str]]:
    """The validation documents of the default recipe's corpus."""
    from llamac.data.pipeline import load_documents, split_documents
    data, seed = DataConfig(), Recipe().seed
    _, val = split_documents(load_documents(data.sources, data), data.val_fraction, seed)
    if not val:
        raise LlamacError("next_sentence: the built-in corpus has no held-out documents")
    return val


@lru_cache(maxsize=2)
def next_sentence_items(n_items: int = N_ITEMS, seed: int = 0) -> tuple:
    """The items, in a fixed order. Passages are taken from the documents in turn (so one long book
    does not make up the set, and the first N items are spread over the documents too). One distractor
    comes from elsewhere in the same document (on topic: only the order of ideas tells it from the
    answer), the others from other documents, of about the answer's length."""
    docs = [sentences(text) for _, text in heldout_documents()]
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.arange(CONTEXT_SENTENCES, len(s)))) for s in docs]
    positions = []
    while len(positions) < n_items and any(queues):
        for d, queue in enumerate(queues):
            if queue and len(positions) < n_items:
                positions.append((d, int(queue.pop())))
    if len(positions) < n_items:
        raise LlamacError(f"next_sentence: the held-out text has {len(positions)} passages, fewer than {n_items}")
    pool = [(d, s) for d, sents in enumerate(docs) for s in sents]
    lengths = np.array([len(s) for _, s in pool])
    items = []
    for d, i in positions:
        answer = docs[d][i]
        nearby = set(docs[d][i - CONTEXT_SENTENCES:i + 2])
        same = [s for s in dict.fromkeys(docs[d]) if s not in nearby]
        picked = [same[j] for j in rng.permutation(len(same))[:SAME_DOCUMENT]]
        if len(picked) < N_CHOICES - 1:
            similar = [j for j in np.flatnonzero((lengths >= len(answer) / 2) & (lengths <= 2 * len(answer)))
                       if pool[j][0] != d]
            picked += [pool[j][1] for j in rng.choice(similar, N_CHOICES - 1 - len(picked), replace=False)]
        label = int(rng.integers(N_CHOICES))
        choices = picked[:label] + [answer] + picked[label:]
        items.append(Item(" ".join(docs[d][i - CONTEXT_SENTENCES:i]), tuple(choices), label))
    return tuple(items)
