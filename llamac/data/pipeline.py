"""Recipe in, token shards out: `prepare_data` behind `llamac tokenize` and `llamac pretrain`.

Steps: read the documents of `data.sources`; hold out whole documents for validation;
train a tokenizer on the training documents (unless `tokenizer.path` names one);
encode every document as `<s> text </s>` into `train.bin` and `val.bin`.

It is idempotent: `data.json` records a hash of the documents, the settings and the
tokenizer, and when they are unchanged the existing files are used as they are.
Everything is deterministic, so two runs write byte-identical files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from llamac.data.shards import ShardWriter, token_dtype
from llamac.data.sources import iter_documents
from llamac.data.tokenizer import Tokenizer, train_tokenizer
from llamac.errors import LlamacError

PIPELINE_VERSION = 1        # bump when cleaning, splitting or the layout changes: old data is re-made
STAMP = "data.json"
BATCH_CHARS = 4 << 20       # text encoded per call (and per progress update)


@dataclass
class DataInfo:
    tokenizer_path: str
    train_path: str
    val_path: str
    n_train_tokens: int
    n_val_tokens: int
    vocab_size: int
    n_documents: int
    n_val_documents: int = 0


def data_dir(recipe) -> Path:
    return Path(recipe.data.shard_dir or Path(recipe.out_dir) / "data")


def prepare_data(recipe, force: bool = False, verbose: bool = True) -> DataInfo:
    """Tokenizer and shards for `recipe`, made only when missing or out of date (or `force`)."""
    out = data_dir(recipe)
    data, tok_cfg = recipe.data, recipe.tokenizer
    documents = load_documents(data.sources, data)
    corpus = _hash_documents(documents)
    train_docs, val_docs = split_documents(documents, data.val_fraction, recipe.seed)
    stamp = _read_stamp(out)

    if tok_cfg.path:
        tokenizer_path = Path(tok_cfg.path).expanduser()
        if not tokenizer_path.is_file():
            raise LlamacError(f"tokenizer.path {tok_cfg.path} not found "
                              "(leave tokenizer.path empty to train one from the data)")
        tokenizer_key = None
    else:
        tokenizer_path = out / "tokenizer.model"
        tokenizer_key = _hash_json({"corpus": corpus, "version": PIPELINE_VERSION, "seed": recipe.seed,
                                    "val_fraction": data.val_fraction, "vocab_size": tok_cfg.vocab_size,
                                    "model_type": tok_cfg.model_type, "user": list(tok_cfg.user_defined_symbols),
                                    "input_sentence_size": tok_cfg.input_sentence_size})
        trained = stamp.get("tokenizer_key") == tokenizer_key and stamp.get("tokenizer_sha256") == _hash_file(tokenizer_path)
        if force or not trained:
            train_tokenizer((text for _, text in train_docs), out / "tokenizer", tok_cfg.vocab_size,
                            model_type=tok_cfg.model_type, input_sentence_size=tok_cfg.input_sentence_size,
                            user_defined_symbols=tok_cfg.user_defined_symbols, seed=recipe.seed,
                            num_threads=getattr(data, "num_workers", None), verbose=verbose)

    tokenizer_sha = _hash_file(tokenizer_path)
    shard_key = _hash_json({"corpus": corpus, "tokenizer": tokenizer_sha, "version": PIPELINE_VERSION,
                            "seed": recipe.seed, "val_fraction": data.val_fraction})
    train_path, val_path = out / "train.bin", out / "val.bin"
    if (not force and stamp.get("shard_key") == shard_key and train_path.is_file() and val_path.is_file()):
        info = DataInfo(**{**stamp["info"], "tokenizer_path": str(tokenizer_path),
                           "train_path": str(train_path), "val_path": str(val_path)})
        if verbose:
            _report(info, "up to date")
        return info

    tokenizer = Tokenizer(tokenizer_path)
    workers = getattr(data, "num_workers", None)
    started = time.perf_counter()
    n_train = write_documents(tokenizer, [t for _, t in train_docs], train_path, workers, verbose, "encode train")
    n_val = write_documents(tokenizer, [t for _, t in val_docs], val_path, workers, verbose, "encode val")
    seconds = time.perf_counter() - started
    n_docs = len(train_docs) + len(val_docs)
    info = DataInfo(str(tokenizer_path), str(train_path), str(val_path), n_train, n_val,
                    tokenizer.vocab_size, n_docs, len(val_docs))
    n_bytes = sum(len(t.encode("utf-8")) for _, t in documents)
    _write_stamp(out, {"shard_key": shard_key, "tokenizer_key": tokenizer_key, "tokenizer_sha256": tokenizer_sha,
                       "sources": list(data.sources), "n_bytes": n_bytes,
                       "tokens_per_byte": round((n_train + n_val - 2 * n_docs) / max(n_bytes, 1), 4),
                       "encode_seconds": round(seconds, 2), "info": dataclasses.asdict(info)})
    if verbose:
        _report(info, f"encoded {n_bytes / 1e6:.1f} MB in {seconds:.1f}s ({n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
        if n_val and n_val < data.seq_len + 1:
            print(f"warning: the validation shard has {n_val} tokens, fewer than data.seq_len + 1 = {data.seq_len + 1}")
    return info


def _report(info: DataInfo, what: str) -> None:
    print(f"data {what}: {info.n_documents} documents; train {info.n_train_tokens:,} tokens "
          f"({info.train_path}), val {info.n_val_tokens:,} tokens in {info.n_val_documents} documents; "
          f"tokenizer {info.tokenizer_path} ({info.vocab_size} pieces)")


# ---------------------------------------------------------------- documents

def load_documents(sources: Sequence[str], data_cfg=None) -> list[tuple[str, str]]:
    documents = list(iter_documents(sources, data_cfg))
    if not documents:
        raise LlamacError(f"no text in data.sources ({', '.join(map(str, sources))}): every document is empty")
    return documents


def split_documents(documents: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): whole documents, in their original order, about `val_fraction` of the text
    (in characters) held out. Documents are drawn in a seeded random order, each taken if it still fits. When
    none fits (one long book, say), the end of the longest document, cut at a line break,
    becomes the validation document instead."""
    if val_fraction <= 0 or not documents:
        return list(documents), []
    sizes = np.array([len(text) for _, text in documents])
    budget = val_fraction * sizes.sum()
    held = np.zeros(len(documents), dtype=bool)
    taken = n_held = 0
    for i in np.random.default_rng(seed).permutation(len(documents)):
        if taken + sizes[i] <= budget and n_held < len(documents) - 1:
            held[i], taken, n_held = True, taken + sizes[i], n_held + 1
    if held.any():
        return ([d for d, h in zip(documents, held) if not h], [d for d, h in zip(documents, held) if h])
    longest = int(np.argmax(sizes))
    name, text = documents[longest]
    cut = _cut_point(text, len(text) - max(1, int(budget)))
    train = list(documents)
    train[longest] = (name, text[:cut])
    return train, [(f"{name} (end)", text[cut:])]


def _cut_point(text: str, target: int) -> int:
    """A line start near `target`, else `target` itself; never 0 or len(text)."""
    target = min(max(target, 1), len(text) - 1)
    newline = text.rfind("\n", 0, target)
    return newline + 1 if 0 < newline + 1 < len(text) else target


# ---------------------------------------------------------------- encoding

def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], workers: Optional[int] = None,
                     progress=None) -> Iterable[tuple[np.ndarray, int]]:
    """Yield (tokens, number of documents) per batch of texts: each document as `<s> ids </s>`."""
    dtype = token_dtype(tokenizer.vocab_size)
    bos = np.array([tokenizer.bos_id], dtype=dtype)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for batch in _batches(texts, BATCH_CHARS):
        pieces = []
        for ids in tokenizer.encode_arrays(batch, num_threads=workers):
            pieces += (bos, ids, eos)
        yield np.concatenate(pieces).astype(dtype, copy=False), len(batch)
        if progress is not None:
            progress.update(sum(len(t.encode("utf-8")) for t in batch))


def write_documents(tokenizer: Tokenizer, texts: Sequence[str], path: Path, workers: Optional[int] = None,
                    verbose: bool = False, description: str = "encode") -> int:
    from tqdm.auto import tqdm
    total = sum(len(t.encode("utf-8")) for t in texts)
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not verbose, leave=False) as bar, \
            ShardWriter(path, tokenizer.vocab_size) as writer:
        for tokens, n_docs in encode_documents(tokenizer, texts, workers, bar):
            writer.write(tokens, n_docs)
    return writer.n_tokens


def _batches(texts: Sequence[str], max_chars: int):
    batch, size = [], 0
    for text in texts:
        if batch and size + len(text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


# ---------------------------------------------------------------- the stamp

def _hash_documents(documents) -> str:
    digest = hashlib.sha256()
    for name, text in documents:
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0\0")
    return digest.hexdigest()


def _hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _hash_file(path: Path) -> Optional[str]:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _read_stamp(out: Path) -> dict:
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(out: Path, stamp: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{STAMP}.{os.getpid()}.partial"
    partial.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out / STAMP)


# ---------------------------------------------------------------- measurements (for `llamac bench`)

def builtin_texts(name: str = "classics") -> list[str]:
    return [text for _, text in iter_documents([f"builtin:{name}"])]


def measure_encoding_speed(tokenizer_path=None, text=None, workers: Optional[int] = None, repeats: int = 3) -> dict:
    """MB/s and tokens per byte of encoding `text` (a str, a list of documents, or by default the
    built-in classics corpus) into token arrays as the pipeline does; the best of `repeats` runs.
    MB are 10**6 bytes of UTF-8; tokens per byte count text tokens, not <s> and </s>.
    Without a tokenizer, one of 8,192 pieces is first trained on the corpus (measure_builtin_tokenizer)."""
    if tokenizer_path is None:
        return measure_builtin_tokenizer(8192, workers=workers, texts=text, repeats=repeats)
    tokenizer = Tokenizer(tokenizer_path)
    texts = builtin_texts() if text is None else [text] if isinstance(text, str) else list(text)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    best, n_tokens = float("inf"), 0
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        n_tokens = sum(len(tokens) for tokens, _ in encode_documents(tokenizer, texts, workers))
        best = min(best, time.perf_counter() - started)
    n_text_tokens = n_tokens - 2 * len(texts)
    return {"mb_per_s": round(n_bytes / 1e6 / best, 2), "tokens_per_byte": round(n_text_tokens / max(n_bytes, 1), 4),
            "bytes": n_bytes, "tokens": n_text_tokens, "documents": len(texts), "seconds": round(best, 3),
            "workers": workers or os.cpu_count() or 1}


def measure_builtin_tokenizer(vocab_size: int = 8192, workers: Optional[int] = None, texts=None,
                              repeats: int = 3, model_dir: Optional[str] = None) -> dict:
    """Train a tokenizer on the built-in classics corpus (or `texts`), then measure it on the same
    text: tokens per byte, MB/s and the training time in seconds. Takes a few seconds."""
    import tempfile
    texts = builtin_texts() if texts is None else [texts] if isinstance(texts, str) else list(texts)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        path = train_tokenizer(texts, Path(model_dir or scratch) / f"bench_{vocab_size}", vocab_size,
                               num_threads=workers)
        train_seconds = time.perf_counter() - started
        result = measure_encoding_speed(path, texts, workers, repeats)
    return {"vocab_size": vocab_size, "train_seconds": round(train_seconds, 2), **result}
