"""Token shards: one flat array of token ids in a file with a 64-byte header, read by memory map.

Layout (little-endian):

    offset  size  field
         0     8  magic b"LLMCTOKS"
         8     4  format version (1)
        12     4  bytes per token: 2 (uint16, vocabularies up to 65,536) or 4 (uint32)
        16     8  number of tokens
        24     4  vocabulary size of the tokenizer that made it
        28     4  number of documents
        32    32  zero
        64     …  the tokens

Documents follow one another as `<s> text </s>`, so a shard is the stream a model trains on.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamac.errors import LlamacError

MAGIC = b"LLMCTOKS"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQII")


@dataclass(frozen=True)
class ShardHeader:
    n_tokens: int
    dtype: np.dtype
    vocab_size: int
    n_documents: int
    version: int = VERSION


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays, then `close()`: the file appears, complete, only then (written beside it
    under a temporary name and renamed), so an interrupted run never leaves a short shard behind."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.n_tokens = 0
        self.n_documents = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")  # one per writer
        self._file = open(self._partial, "wb")
        self._file.write(bytes(HEADER_SIZE))

    def write(self, tokens, n_documents: int = 0) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise LlamacError(f"{self.path}: token id {int(tokens.max())} outside the vocabulary of {self.vocab_size}")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += int(tokens.size)
        self.n_documents += int(n_documents)

    def close(self) -> ShardHeader:
        header = ShardHeader(self.n_tokens, self.dtype, self.vocab_size, self.n_documents)
        self._file.seek(0)
        self._file.write(_pack(header))
        self._file.close()
        os.replace(self._partial, self.path)
        return header

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pack(header: ShardHeader) -> bytes:
    packed = _HEADER.pack(MAGIC, header.version, header.dtype.itemsize, header.n_tokens,
                          header.vocab_size, header.n_documents)
    return packed + bytes(HEADER_SIZE - len(packed))


def write_shard(path: str | os.PathLike, tokens, vocab_size: int, n_documents: int = 0) -> ShardHeader:
    writer = ShardWriter(path, vocab_size)
    try:
        writer.write(tokens, n_documents)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    if not path.is_file():
        raise LlamacError(f"token shard not found: {path}")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise LlamacError(f"{path} is not a llamac token shard (bad magic); rerun `llamac tokenize`")
    _, version, itemsize, n_tokens, vocab_size, n_documents = _HEADER.unpack(raw[:_HEADER.size])
    if version != VERSION:
        raise LlamacError(f"{path}: shard format version {version}, this llamac reads {VERSION}; rerun `llamac tokenize`")
    if itemsize not in (2, 4):
        raise LlamacError(f"{path}: unknown token size {itemsize} bytes")
    expected = HEADER_SIZE + n_tokens * itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise LlamacError(f"{path}: {actual} bytes, but its header promises {expected} (truncated?); "
                          "rerun `llamac tokenize --force`")
    dtype = np.dtype(np.uint16) if itemsize == 2 else np.dtype(np.uint32)
    return ShardHeader(n_tokens, dtype, vocab_size, n_documents, version)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (nothing is read until it is indexed)."""
    header = read_header(path)
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))
