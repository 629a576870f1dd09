"""The names of evaluation tasks, as `llamac eval --tasks` and `train.eval_tasks` take them.

    bpb                 bits per byte on the run's validation split
    bpb:PATH            ... on text files, a folder of them or JSONL (the `text` field)
    skills              exact match on the built-in held-out instruct tasks
    next_sentence       the built-in multiple-choice set (llamac.eval.builtin)
    mc:PATH, PATH.jsonl multiple choice from a JSONL file (llamac.eval.choice)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamac.errors import LlamacError

KNOWN = "bpb, bpb:PATH, skills, next_sentence, mc:PATH (a JSONL file)"


@dataclass(frozen=True)
class TaskSpec:
    kind: str                   # bpb | skills | next_sentence | mc
    path: str | None = None

    @property
    def name(self) -> str:
        """The task's name in tables, JSON and metrics.jsonl."""
        if self.kind == "mc":
            return Path(self.path).stem
        if self.kind == "bpb" and self.path is not None:
            return f"bpb:{Path(self.path).stem or self.path}"
        return self.kind


def parse_task(text: str) -> TaskSpec:
    text = str(text).strip()
    kind, sep, rest = text.partition(":")
    if text in ("bpb", "skills", "next_sentence"):
        return TaskSpec(text)
    if sep and kind in ("bpb", "mc") and rest:
        return TaskSpec(kind, rest)
    if text.endswith(".jsonl"):
        return TaskSpec("mc", text)
    raise LlamacError(f"unknown eval task {text!r}; choose from {KNOWN}")


def parse_tasks(spec) -> list[TaskSpec]:
    """A comma-separated string or a list of names -> TaskSpecs, duplicates dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or [])
    tasks = [parse_task(n) for n in names if str(n).strip()]
    if not tasks:
        raise LlamacError(f"no eval task given; choose from {KNOWN}")
    return list(dict.fromkeys(tasks))
