"""What the exporters share: a SentencePiece model read without protobuf (SpmVocab) and progress bars."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamac.data.tokenizer import SPECIAL_TOKENS, proto_fields
from llamac.errors import LlamacError
from llamac.infer.chat import END_OF_TURN

PROGRESS_BYTES = 64 << 20          # progress bars only for outputs this large


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=total < PROGRESS_BYTES, leave=False)


# ------------------------------------------------------------------ SentencePiece model, read without protobuf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6   # SentencePiece = GGUF token types


@dataclass
class SpmVocab:
    """What the exporters need from a SentencePiece ModelProto (sentencepiece_model.proto field numbers)."""
    pieces: list
    scores: list
    types: list
    model_type: int = 1              # 1 unigram, 2 bpe
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    charsmap: bytes = b""

    @classmethod
    def read(cls, path) -> "SpmVocab":
        data = Path(path).read_bytes()
        v = cls([], [], [])
        try:
            for num, value, _, _ in proto_fields(data):
                if num == 1:                                  # repeated SentencePiece pieces
                    piece = {n: x for n, x, _, _ in proto_fields(value)}
                    v.pieces.append(bytes(piece.get(1, b"")).decode("utf-8"))
                    v.scores.append(float(np.frombuffer(piece.get(2, b"\0\0\0\0"), "<f4")[0]))
                    v.types.append(int(piece.get(3, NORMAL)))
                elif num == 2:                                # TrainerSpec
                    spec = {n: x for n, x, _, _ in proto_fields(value)}
                    v.model_type = spec.get(3, 1)
                    v.byte_fallback = bool(spec.get(35, 0))
                    v.unk_id, v.bos_id, v.eos_id, v.pad_id = (_int32(spec.get(k, d)) for k, d in
                                                              ((40, 0), (41, 1), (42, 2), (43, -1)))
                elif num == 3:                                # NormalizerSpec
                    spec = {n: x for n, x, _, _ in proto_fields(value)}
                    v.charsmap = bytes(spec.get(2, b""))
                    v.add_dummy_prefix, v.remove_extra_whitespaces, v.escape_whitespaces = (
                        bool(spec.get(k, 1)) for k in (3, 4, 5))
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise LlamacError(f"{path} is not a SentencePiece model ({exc})") from None
        if not v.pieces:
            raise LlamacError(f"{path} is not a SentencePiece model (no pieces)")
        return v

    def piece(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None

    def export_types(self) -> list:
        """Token types as the exports declare them: the chat tokens, user-defined pieces in SentencePiece,
        become control tokens (as llama.cpp's converter types "<|...|>" pieces), which llama.cpp and
        transformers cut out of a rendered template and leave out of decoded text."""
        return [CONTROL if t == USER_DEFINED and p in SPECIAL_TOKENS else t for p, t in zip(self.pieces, self.types)]

    @property
    def end_of_turn_id(self) -> int | None:
        """<|end|>, which ends the assistant's turn in the chat template, where the vocabulary has it."""
        return _piece_id(self, END_OF_TURN)

    def eos_ids(self) -> list:
        """The tokens that end generation: </s>, then the end of turn."""
        ids = [self.eos_id] if self.eos_id >= 0 else []
        return ids + ([self.end_of_turn_id] if self.end_of_turn_id not in (None, *ids) else [])


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value   # negative int32s are 10-byte varints


# ------------------------------------------------------------------ Hugging Face


def _piece_id(vocab: SpmVocab | None, piece: str) -> int | None:
    return vocab.pieces.index(piece) if vocab is not None and piece in vocab.pieces else None
