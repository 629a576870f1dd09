"""A Llama-compatible SentencePiece tokenizer: load any `.model`, or train a new one.

Models trained here are set up as Llama's: BPE with byte fallback (no text is ever
`<unk>`), split digits, identity normalization, a dummy-prefix space, whitespace kept
as is; ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`, and 3..10 the reserved chat tokens.
So `decode(encode(s)) == s` for every string: SentencePiece's decode removes exactly
the one dummy-prefix space that encode added. The case the library itself gets wrong
is a literal U+2581, the "▁" it writes spaces as: it decodes to a space. `encode`
spells that character with its three byte pieces instead, so it round-trips too.

`special=True` encodes text the way llama.cpp and transformers encode a rendered chat
template: the special pieces (<s>, </s>, <unk> and the chat tokens) are cut out as their
ids and each run of text between them is encoded on its own, with its own dummy prefix.
That rule is llama.cpp's SentencePiece tokenizer's (it cannot be configured away), so
text encoded this way is what a GGUF export sees; its decode shows those prefixes as spaces.
"""
from __future__ import annotations

import io
import os
import re
import time
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from llamac.errors import LlamacError

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>",
                  "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>")
SPACE = "\u2581"        # SentencePiece's visible space
SENTENCE_CHARS = 4096   # training text is fed in pieces this long, cut at paragraph or line ends
CHUNK_CHARS = 1 << 16   # bulk encoding cuts longer texts so that they share the threads


class Tokenizer:
    """A SentencePiece model file (`path`), or serialized model bytes (`Tokenizer.from_bytes`)."""

    def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            if path is None or not Path(path).is_file():
                raise LlamacError(f"tokenizer model not found: {path}")
            model_proto = Path(path).read_bytes()
        self.path = str(path) if path is not None else None
        self._proto = bytes(model_proto)
        self._sp = sp = _load_processor(self._proto, self.path or "model bytes")
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()
        self.special_ids = {t: i for t in SPECIAL_TOKENS if (i := sp.piece_to_id(t)) != self.unk_id}
        space_bytes = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode()]
        self._space_bytes = space_bytes if all(sp.is_byte(i) for i in space_bytes) else None
        self._numpy_out = _supports_numpy_output(sp)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """A tokenizer from `model_proto_bytes()`, e.g. as embedded in a checkpoint."""
        return cls(model_proto=model_proto)

    def model_proto_bytes(self) -> bytes:
        return self._proto

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or 'bytes'}, vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- vocabulary

    @cached_property
    def pieces(self) -> list:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    @cached_property
    def scores(self) -> list:
        return [self._sp.get_score(i) for i in range(self.vocab_size)]

    @cached_property
    def special_pieces(self) -> dict:
        """{piece: id} of the pieces `special=True` cuts at: control pieces, <unk>, the chat tokens."""
        sp = self._sp
        pieces = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        return {**pieces, **self.special_ids}

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([int(token_id)])
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `unk_id` when the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, for streaming output: a byte piece is its byte, "▁" a
        space, a control token nothing. A dummy-prefix space is not removed here."""
        self._check_ids([int(token_id)])
        return self._byte_table[int(token_id)]

    @cached_property
    def _byte_table(self) -> list:
        sp = self._sp
        return [b"" if sp.is_control(i) else bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                else " \u2047 ".encode() if sp.is_unknown(i) else sp.id_to_piece(i).replace(SPACE, " ").encode()
                for i in range(self.vocab_size)]

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text`; `special`: cut at the special pieces first (module docstring)."""
        if not isinstance(text, str):
            raise LlamacError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        if special:
            ids = []
            for start, end, token in self._special_runs(text):
                ids += [token] if token is not None else self.encode(text[start:end], bos=False)
            return self._wrap(ids, bos, eos)
        if self._space_bytes is not None and SPACE in text:
            return self._wrap(self._encode_literal_spaces(text), bos, eos)
        return self._wrap(self._sp.encode(text), bos, eos)

    def encode_with_offsets(self, text: str, bos: bool = True, eos: bool = False, special: bool = False):
        """(ids, offsets): `offsets[k]` is the [start, end) span of `text` (str indices) that
        token k spells. The byte pieces of one character all get that character's span;
        <s>, </s> and a lone dummy-prefix "▁" get an empty span. `special` as for `encode`."""
        if special:
            ids, offsets = [], []
            for start, end, token in self._special_runs(text):
                if token is not None:
                    ids.append(token)
                    offsets.append((start, end))
                else:
                    run_ids, run_offsets = self._run_offsets(text[start:end])
                    ids += run_ids
                    offsets += [(a + start, b + start) for a, b in run_offsets]
        else:
            ids, offsets = self._run_offsets(text)
        head = [(0, 0)] if bos and self.bos_id >= 0 else []
        tail = [(len(text), len(text))] if eos and self.eos_id >= 0 else []
        return self._wrap(ids, bos, eos), head + offsets + tail

    def _run_offsets(self, text: str):
        ids = self.encode(text, bos=False)
        table, raw = self._byte_table, text.encode("utf-8")
        spelled = b"".join(table[i] for i in ids)
        lead = len(spelled) - len(raw)  # 1 where the dummy prefix added a space
        if lead not in (0, 1) or spelled[lead:] != raw:
            raise LlamacError("encode_with_offsets needs a tokenizer that keeps text verbatim "
                              "(identity normalization and byte fallback)")
        char_at = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))] + [len(text)]
        offsets, pos = [], -lead
        for i in ids:
            begin, end = max(pos, 0), pos + len(table[i])
            pos = end
            offsets.append((char_at[begin], char_at[end - 1] + 1) if end > begin else (char_at[begin],) * 2)
        return ids, offsets

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     num_threads: Optional[int] = None) -> list[list[int]]:
        """Many texts at once, on `num_threads` SentencePiece threads (default: all cores)."""
        return [self._wrap(ids.tolist(), bos, eos) for ids in self.encode_arrays(texts, num_threads)]

    def encode_arrays(self, texts: Sequence[str], num_threads: Optional[int] = None) -> list[np.ndarray]:
        """The ids of each text as an int32 array, no bos/eos: the fast path for bulk encoding, on
        SentencePiece's C++ threads (it releases the GIL). A long text is cut before spaces that no
        token can span, so it is spread over the threads too and gets the same ids as in one piece."""
        texts = list(texts)
        starts, continuations, literal = [], [], []  # (text index, chunk): with / without the dummy prefix
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LlamacError(f"Tokenizer.encode_batch: item {i} is {type(text).__name__}, not a str")
            if self._space_bytes is not None and SPACE in text:
                literal.append(i)
            elif len(text) > CHUNK_CHARS and self._cuts_are_safe:
                first, *rest = _cut_before_spaces(text, CHUNK_CHARS)
                starts.append((i, first))
                continuations += [(i, chunk) for chunk in rest]
            else:
                starts.append((i, text))
        parts: list[list] = [[] for _ in texts]
        threads = num_threads or os.cpu_count() or 1
        for jobs, sp in ((starts, self._sp), (continuations, self._no_prefix if continuations else None)):
            for (i, _), ids in zip(jobs, self._encode_list(sp, [chunk for _, chunk in jobs], threads)):
                parts[i].append(ids)
        for i in literal:
            parts[i].append(np.asarray(self._encode_literal_spaces(texts[i]), dtype=np.int32))
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # NumPy (or CuPy) arrays
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        self._check_ids(ids)
        return self._sp.decode(ids)

    # ---------------------------------------------------------------- internals

    @cached_property
    def _special_pattern(self):
        return re.compile("|".join(re.escape(p) for p in sorted(self.special_pieces, key=len, reverse=True)))

    def _special_runs(self, text: str):
        """(start, end, id) for each special piece of `text` and (start, end, None) for each
        non-empty run of text between them, in order."""
        pos = 0
        for match in self._special_pattern.finditer(text) if self.special_pieces else ():
            if match.start() > pos:
                yield pos, match.start(), None
            yield match.start(), match.end(), self.special_pieces[match.group()]
            pos = match.end()
        if pos < len(text):
            yield pos, len(text), None

    def _wrap(self, ids: list, bos: bool, eos: bool) -> list[int]:
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        return head + ids + ([self.eos_id] if eos and self.eos_id >= 0 else [])

    def _encode_list(self, sp, texts: list, threads: int) -> list:
        if not texts:
            return []
        if self._numpy_out:
            return list(sp.encode(texts, num_threads=threads, return_type="numpy"))
        return [np.asarray(ids, dtype=np.int32) for ids in sp.encode(texts, num_threads=threads)]

    def _encode_literal_spaces(self, text: str) -> list[int]:
        # Each "▁" becomes <0xE2><0x96><0x81>, the text between is encoded as usual but
        # without a dummy prefix after the first. The library's decode then gives the text
        # back: byte pieces are copied verbatim, and only a first piece's "▁" is dropped.
        first, *rest = text.split(SPACE)
        ids = self._sp.encode(first)
        for segment in rest:
            ids += self._space_bytes + self._no_prefix.encode(segment)
        return ids

    @cached_property
    def _no_prefix(self) -> spm.SentencePieceProcessor:
        """The same model without the dummy-prefix space, for text that continues other text."""
        if not _normalizer_spec(self._proto)["add_dummy_prefix"]:
            return self._sp
        return _load_processor(_without_dummy_prefix(self._proto), "model bytes")

    @cached_property
    def _cuts_are_safe(self) -> bool:
        # Text kept verbatim, and no piece with "▁" after another character: then no token
        # spans the start of a run of spaces, and text cut there encodes to the same ids.
        spec, sp = _normalizer_spec(self._proto), self._sp
        if spec["name"] != "identity" or spec["remove_extra_whitespaces"]:
            return False
        return not any(SPACE in sp.id_to_piece(i).lstrip(SPACE) for i in range(self.vocab_size)
                       if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)))

    def _check_ids(self, ids: list) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise LlamacError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")


def _load_processor(proto: bytes, where: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(proto)
    except (RuntimeError, OSError) as exc:
        raise LlamacError(f"not a SentencePiece model: {where} ({str(exc).splitlines()[0]})") from None
    return sp


def _supports_numpy_output(sp) -> bool:
    try:  # sentencepiece >= 0.2.1 returns arrays, without making a Python int per token
        sp.encode([""], return_type="numpy")
        return True
    except (TypeError, ValueError, RuntimeError):
        return False


def _cut_before_spaces(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each cut just before a space that follows a non-space."""
    chunks, begin = [], 0
    while len(text) - begin > size:
        cut = text.find(" ", begin + size)
        while cut > 0 and text[cut - 1] == " ":
            cut = text.find(" ", cut + 1)
        if cut < 0:
            break
        chunks.append(text[begin:cut])
        begin = cut
    return chunks + [text[begin:]]


# ---------------------------------------------------------------- the model proto, by hand
# Just enough protobuf to read the NormalizerSpec (ModelProto field 3) and to turn off its
# add_dummy_prefix (field 3), without depending on the protobuf package.

def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result, pos, shift = result | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return result, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
    return bytes(out + bytes([value]))


def proto_fields(buf: bytes):
    """(field number, value, start, end) for each top-level field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise LlamacError(f"unsupported protobuf wire type {wire} in the SentencePiece model")
        yield key >> 3, value, start, pos


def _normalizer_spec(proto: bytes) -> dict:
    spec = {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True}  # protobuf defaults
    names = {1: "name", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}
    for number, value, _, _ in proto_fields(proto):
        for field, inner, _, _ in proto_fields(value) if number == 3 else ():
            if field in names:
                spec[names[field]] = bytes(inner).decode("utf-8", "replace") if field == 1 else bool(inner)
    return spec


def _without_dummy_prefix(proto: bytes) -> bytes:
    off = b"\x18\x00"  # field 3 (add_dummy_prefix) = 0; of repeated values the last one wins
    out, seen = bytearray(), False
    for number, value, start, end in proto_fields(proto):
        if number == 3:
            seen = True
            out += b"\x1a" + _varint(len(value) + len(off)) + bytes(value) + off
        else:
            out += proto[start:end]
    return bytes(out) if seen else bytes(out) + b"\x1a\x02" + off


# ---------------------------------------------------------------- training

def training_sentences(documents: Iterable[str], limit: int = SENTENCE_CHARS):
    """Documents in pieces of at most `limit` characters, cut at paragraph (else line) ends with
    the newlines kept: the trainer sees text as it will be encoded, so it learns pieces such as
    ".\\n" and "\\n\\n", and no piece is longer than it accepts."""
    for doc in documents:
        buffer = ""
        for paragraph in re.split(r"(?<=\n\n)", doc):
            parts = [paragraph] if len(paragraph) <= limit else [
                line[i:i + limit] for line in paragraph.splitlines(keepends=True) for i in range(0, len(line), limit)]
            for part in parts:
                if buffer and len(buffer) + len(part) > limit:
                    yield buffer
                    buffer = ""
                buffer += part
        if buffer:
            yield buffer


def train_tokenizer(text_iter_or_files, model_prefix: str | os.PathLike, vocab_size: int = 8192, *,
                    model_type: str = "bpe", input_sentence_size: int = 2_000_000,
                    user_defined_symbols: Sequence[str] = (), seed: int = 0,
                    num_threads: Optional[int] = None, verbose: bool = False) -> str:
    """Train a Llama-style SentencePiece model; returns the path `<model_prefix>.model`.

    `text_iter_or_files`: documents (str), or files (`pathlib.Path`, read whole as UTF-8).
    The same text, settings and seed give a byte-identical model.
    """
    from tqdm.auto import tqdm
    if model_type not in ("bpe", "unigram"):
        raise LlamacError(f"tokenizer.model_type must be bpe or unigram, got {model_type!r}")
    symbols = _symbols(user_defined_symbols)
    fed = {"bytes": 0, "sentences": 0, "error": None}
    progress = tqdm(desc="tokenizer text", unit="B", unit_scale=True, disable=not verbose, leave=False)

    def sentences():
        try:
            documents = (_read_file(item) if isinstance(item, os.PathLike) else item for item in text_iter_or_files)
            for sentence in training_sentences(documents):
                size = len(sentence.encode("utf-8"))
                fed["bytes"], fed["sentences"] = fed["bytes"] + size, fed["sentences"] + 1
                progress.update(size)
                yield sentence
        except Exception as exc:  # SentencePiece would swallow it: raised again below
            fed["error"] = exc

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # it samples input_sentence_size sentences from larger data
    started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=symbols,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=4 * SENTENCE_CHARS, num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as exc:
        raise fed["error"] or _training_error(exc, vocab_size, fed) from None
    finally:
        progress.close()
    if fed["error"] is not None:
        raise fed["error"]
    path, partial = Path(f"{model_prefix}.model"), Path(f"{model_prefix}.model.{os.getpid()}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(model.getvalue())
    os.replace(partial, path)  # never a half-written model under the real name
    if verbose:
        print(f"trained a {vocab_size}-piece {model_type} tokenizer on {fed['bytes'] / 1e6:.1f} MB "
              f"in {time.perf_counter() - started:.1f}s: {path}")
    return str(path)


def _symbols(user_defined_symbols: Sequence[str]) -> list[str]:
    return list(SPECIAL_TOKENS) + [s for s in user_defined_symbols if s not in SPECIAL_TOKENS]


def min_vocab_size(user_defined_symbols: Sequence[str] = ()) -> int:
    """The fewest pieces `train_tokenizer` can make: <unk> <s> </s>, the special and user symbols,
    256 byte-fallback pieces, the space piece and one character (any text has one)."""
    return 3 + len(_symbols(user_defined_symbols)) + 256 + 2


def _read_file(path) -> str:
    from llamac.data.sources import read_text
    if not Path(path).is_file():
        raise LlamacError(f"tokenizer training file not found: {path}")
    return read_text(Path(path))


def _training_error(exc: RuntimeError, vocab_size: int, fed: dict) -> LlamacError:
    message = str(exc)
    if fed["sentences"] == 0:
        return LlamacError("no text to train the tokenizer on (the data sources are empty)")
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return LlamacError(f"tokenizer.vocab_size {vocab_size} is too large for {fed['bytes']} bytes of text: "
                           f"this data supports at most {too_high.group(2)}; lower it or add text")
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return LlamacError(f"tokenizer.vocab_size {vocab_size} is too small: this text needs at least "
                           f"{too_small.group(2)} pieces (characters, bytes and special tokens)")
    lines = [line for line in message.splitlines() if line.strip()]
    return LlamacError(f"SentencePiece could not train the tokenizer: {lines[-1] if lines else message}")


# ---------------------------------------------------------------- a quick look

def show_pieces(text: str, tokenizer_path: str | os.PathLike) -> list[int]:
    """Print the pieces and ids of `text` (no <s>), one per line, then the list of ids."""
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode(text, bos=False)
    for token_id in ids:
        print(f"{token_id:>{len(str(tok.vocab_size))}}  {tok.id_to_piece(token_id)!r}")
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(ids)} tokens for {n_bytes} bytes" + (f", {len(ids) / n_bytes:.3f} tokens/byte" if n_bytes else ""))
    print(ids)
    return ids
