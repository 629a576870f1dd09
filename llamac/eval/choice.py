"""Multiple choice scored by log-likelihood: read items from JSONL, score every choice, report accuracy.

An item is a context, its choices and the index of the right one. Each choice is scored as the
continuation " " + choice after the context (`loglik.encode_pair`), the way lm-evaluation-harness
scores a multiple_choice task with its default target_delimiter: `acc` picks the choice of highest
log-likelihood, `acc_norm` the highest log-likelihood per character of the choice.

A JSONL row is read in whichever of these shapes its keys say (detected per row):

| shape     | keys                                                    | context                         |
|-----------|---------------------------------------------------------|---------------------------------|
| generic   | context, choices (list), label (int)                    | context                         |
| HellaSwag | ctx (or ctx_a, ctx_b), endings, label; activity_label   | "activity: ctx_a Ctx_b"         |
| ARC       | question, choices {text, label}, answerKey              | "Question: ...\\nAnswer:"        |
| PIQA      | goal, sol1, sol2, label                                 | "Question: ...\\nAnswer:"        |
| MMLU      | question, choices (list), answer (int or letter)        | question, lettered choices, "Answer:"; the choices scored are the letters |

Every problem with a file is one line naming the file and row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from llamac.errors import LlamacError
from llamac.eval.loglik import encode_pair, score_pairs

TARGET_DELIMITER = " "
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple
    label: int


# ---------------------------------------------------------------- reading

def read_items(path) -> list[Item]:
    """The items of a JSONL file (blank lines skipped), each row in one of the shapes above."""
    from llamac.data.sources import read_json_rows
    return read_json_rows(path, item_from_row, "multiple-choice file", "multiple-choice items")


def item_from_row(row, where: str) -> Item:
    if not isinstance(row, dict):
        raise LlamacError(f"{where}: each line must be a JSON object")
    if "endings" in row:
        context, choices, label = _hellaswag(row, where)
    elif "goal" in row:
        context = f"Question: {_text(row, 'goal', where)}\nAnswer:"
        choices = [row.get("sol1"), row.get("sol2")]
        if any(c is None for c in choices):
            raise LlamacError(f"{where}: no choices (PIQA rows need sol1 and sol2)")
        label = row.get("label")
    elif "question" in row and isinstance(row.get("choices"), dict):
        context, choices, label = _arc(row, where)
    elif "question" in row and "answer" in row:
        context, choices, label = _mmlu(row, where)
    elif "context" in row or "choices" in row:
        context = _text(row, "context", where)
        choices, label = row.get("choices"), row.get("label")
    else:
        raise LlamacError(f"{where}: no choices: not a multiple-choice row (keys {', '.join(sorted(row)) or 'none'}; "
                          "expected context/choices/label or the HellaSwag, ARC, PIQA or MMLU shape)")
    return Item(context, _choices(choices, where), _label(label, len(choices) if isinstance(choices, list) else 0,
                                                          where))


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise LlamacError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _choices(choices, where: str) -> tuple:
    if not isinstance(choices, list) or len(choices) < 2:
        raise LlamacError(f"{where}: no choices (need a list of at least two strings)")
    if not all(isinstance(c, str) for c in choices):
        raise LlamacError(f"{where}: every choice must be a string")
    return tuple(choices)


def _label(label, n: int, where: str) -> int:
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise LlamacError(f"{where}: label must be an integer index, got {label!r}")
    if not 0 <= label < n:
        raise LlamacError(f"{where}: label {label} out of range for {n} choices (0 to {n - 1})")
    return label


def _preprocess(text: str) -> str:
    """HellaSwag's WikiHow markup out: ' [title]' ends a sentence, other [tags] go, spaces single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, where: str):
    if "ctx_a" in row:
        ctx = f"{_text(row, 'ctx_a', where)} {_text(row, 'ctx_b', where).capitalize()}"
    else:
        ctx = _text(row, "ctx", where)
    activity = row.get("activity_label")
    context = _preprocess(f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx)
    endings = row["endings"]
    choices = [_preprocess(e) for e in endings] if isinstance(endings, list) and \
        all(isinstance(e, str) for e in endings) else endings
    return context, choices, row.get("label")


def _arc(row: dict, where: str):
    spec = row["choices"]
    texts, labels = spec.get("text"), spec.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise LlamacError(f"{where}: no choices (ARC rows need choices.text and choices.label of one length)")
    key = row.get("answerKey")
    if key not in labels:
        raise LlamacError(f"{where}: label {key!r} (answerKey) out of range: not one of {labels}")
    return f"Question: {_text(row, 'question', where)}\nAnswer:", texts, labels.index(key)


def _mmlu(row: dict, where: str):
    choices = _choices(row.get("choices"), where)
    if len(choices) > len(LETTERS):
        raise LlamacError(f"{where}: {len(choices)} choices; MMLU rows take at most {len(LETTERS)}")
    answer = row["answer"]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    lettered = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    context = f"{_text(row, 'question', where).strip()}{lettered}\nAnswer:"
    return context, list(LETTERS[:len(choices)]), answer


# ---------------------------------------------------------------- scoring

def choice_pairs(tokenizer, items) -> list:
    """The (context, " " + choice) token pairs of every item, item by item, choice by choice."""
    return [encode_pair(tokenizer, item.context, TARGET_DELIMITER + choice) for item in items for choice in item.choices]


def score_items(model, tokenizer, items, batch_tokens=None, progress=None) -> dict:
    """acc and acc_norm (length-normalised) over `items`, and each item's log-likelihoods."""
    scores = score_pairs(model, choice_pairs(tokenizer, items), batch_tokens, progress)
    hits = hits_norm = 0
    per_item, k = [], 0
    for item in items:
        lls = np.array([s.logprob for s in scores[k:k + len(item.choices)]])
        k += len(item.choices)
        chars = np.array([float(len(c)) for c in item.choices])
        hits += int(np.argmax(lls) == item.label)
        hits_norm += int(np.argmax(lls / np.maximum(chars, 1.0)) == item.label)
        per_item.append(lls.tolist())
    n = len(items)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n, "loglikelihoods": per_item}
