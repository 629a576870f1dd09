"""`llamac export`: a checkpoint (llamac or Hugging Face folder) to a Hugging Face folder, a GGUF
file for llama.cpp, a native llamac checkpoint, or (a LoRA run) a PEFT adapter folder.

Every output is written under a hidden temporary name beside the target and renamed into place
only once complete, so an interrupted export never leaves a half-written file under the target name.

The Hugging Face folder carries tokenizer.model (for sentencepiece-based loaders and llama.cpp's
converter) and a tokenizer.json built here from the SentencePiece model, the way transformers'
own converter does, so `AutoTokenizer` loads it without protobuf and encodes exactly as
SentencePiece does (tests/test_export.py checks the ids).

Both exports declare the chat tokens (<|user|>, <|end|>, ...) special, and <|end|> a token that
ends generation beside </s>: transformers and llama.cpp then cut the tokens out of a rendered
chat template (the ids llamac's chat encoding gives) and stop at the end of the assistant's turn.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llamac.errors import LlamacError
from llamac.formats import hf
from llamac.formats.hf_import import Source, is_hf_folder, read_hf_folder
from llamac.formats.spm import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, SpmVocab, _piece_id, progress
from llamac.train import checkpoint

FORMATS = ("hf", "gguf", "llamac", "peft")
HF_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
TORCH_DTYPE_NAMES = {torch: short for short, torch in HF_DTYPES.items()}   # --dtype bfloat16 works too
GGUF_DTYPES = ("f32", "f16", "q8_0")


def export(checkpoint, format: str, out, dtype: str = "f32", force: bool = False) -> Path:
    """Write `checkpoint` as `format` ("hf", "gguf", "llamac" or "peft") to `out`; returns `out`.
    A LoRA run exports merged (base + adapters) as hf, gguf and llamac, and as its adapters alone as peft."""
    format, dtype, out = format.lower(), dtype.lower(), Path(out)
    dtype = TORCH_DTYPE_NAMES.get(dtype, dtype) if format in ("hf", "peft") else dtype
    if format not in FORMATS:
        raise LlamacError(f"unsupported export format {format!r} (choose hf, gguf, llamac or peft)")
    allowed = {"hf": HF_DTYPES, "peft": HF_DTYPES, "gguf": GGUF_DTYPES, "llamac": ("f32", "float32")}[format]
    if dtype not in allowed:
        raise LlamacError(f"--dtype {dtype} is not available for --format {format} (choose {', '.join(allowed)})")
    if out.exists() and not force:
        raise LlamacError(f"{out} already exists; pass --force to replace it")
    if format == "gguf" and out.is_dir():
        raise LlamacError(f"{out} is a directory; a GGUF export is a file (e.g. --out model.gguf)")
    src = read_source(checkpoint)
    source = Path(src.path).resolve()
    if out.exists() and (source == out.resolve() or out.resolve() in source.parents):
        raise LlamacError(f"--out {out} holds the checkpoint being exported; choose another output")
    if format == "peft":
        if src.lora is None:
            raise LlamacError(f"{src.path} has no LoRA adapters (a full model): --format peft exports the "
                              "adapters of a run trained with sft.lora; use --format hf for a full model")
        with atomic_output(out) as tmp:
            write_peft(src, tmp, HF_DTYPES[dtype])
    elif format == "gguf":
        from llamac.formats.gguf import write_gguf
        if src.tokenizer_path is None:
            raise LlamacError(f"{src.path} has no tokenizer.model, which a GGUF file needs for its vocabulary")
        with atomic_output(out) as tmp:
            write_gguf(src, tmp, dtype)
    elif format == "hf":
        with atomic_output(out) as tmp:
            write_hf(src, tmp, HF_DTYPES[dtype])
    else:
        with atomic_output(out) as tmp:
            write_llamac(src, tmp)
    print(f"exported {src.path} -> {out} ({format}{'' if format == 'llamac' else ', ' + dtype})", file=sys.stderr)
    return out


def read_source(path) -> Source:
    """A llamac checkpoint (folder or run out_dir) or a Hugging Face folder, as float32 NumPy weights."""
    path = Path(path)
    if is_hf_folder(path):
        return read_hf_folder(path)
    from llamac.train import checkpoint
    ckpt = checkpoint.resolve_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    weights = checkpoint.model_weights(ckpt, state)      # a LoRA run: its base with the adapters merged
    adapters = None
    if "lora" in state:
        tensors, _ = checkpoint.load_safetensors(ckpt / "model.safetensors")
        adapters = {"state": state["lora"], "tensors": tensors}
    tokenizer = ckpt / "tokenizer.model"
    extra = {k: state[k] for k in ("step", "recipe") if k in state}
    return Source(checkpoint.model_config_of(ckpt), {k: np.asarray(v, np.float32) for k, v in weights.items()},
                  ckpt, tokenizer if tokenizer.is_file() else None, state.get("chat_template"), extra, adapters)


@contextmanager
def atomic_output(out: Path):
    """Yield a temporary path beside `out` (not yet created); rename it to `out` on success, remove it on
    any failure or interrupt. An existing `out` (--force) is replaced only after the new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = None
    _remove(tmp)
    try:
        yield tmp
        if out.is_dir() or (out.exists() and tmp.is_dir()):
            # os.replace can't put anything over a folder, or a folder over a file: move the old one aside
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_hf(src: Source, folder: Path, torch_dtype: str):
    """config.json, model.safetensors, generation_config.json and the tokenizer files, into `folder`."""
    folder.mkdir()
    cfg = src.config
    vocab = SpmVocab.read(src.tokenizer_path) if src.tokenizer_path else None
    bos, eos, pad = (vocab.bos_id, vocab.eos_id, vocab.pad_id) if vocab else (1, 2, -1)
    pad = pad if pad >= 0 else _piece_id(vocab, "<|pad|>")
    # several ids as Llama 3 lists them (end of text, end of turn): generate stops at any of them
    eos_ids = vocab.eos_ids() if vocab else [eos]
    eos = eos_ids if len(eos_ids) > 1 else eos
    config = hf.hf_config(cfg, bos, eos, pad, torch_dtype=torch_dtype)
    _write_json(folder / "config.json", config)
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None and pad >= 0:
        generation["pad_token_id"] = pad
    _write_json(folder / "generation_config.json", generation)

    np_dtype = _numpy_dtype(torch_dtype)
    # q/k rows go from llamac's interleaved RoPE pairs to transformers' rotate-half layout, one tensor at a time
    tensors = {}
    for name, w in src.state.items():
        ((hf_name, hf_w),) = hf.to_hf_state({name: w}, cfg).items()
        tensors[hf_name] = hf_w
    write_safetensors(folder / "model.safetensors", tensors, np_dtype, {"format": "pt"})

    if vocab is None:
        print(f"warning: {src.path} has no tokenizer.model; the export has weights but no tokenizer", file=sys.stderr)
        return
    write_tokenizer(src, vocab, pad, folder)


def write_tokenizer(src: Source, vocab: SpmVocab, pad, folder: Path):
    """tokenizer.model, tokenizer.json, special_tokens_map.json and tokenizer_config.json (with the chat
    template) of `src`, into `folder`."""
    cfg = src.config
    bos = vocab.bos_id
    shutil.copyfile(src.tokenizer_path, folder / "tokenizer.model")
    tok_json = tokenizer_json(vocab)
    _write_json(folder / "tokenizer.json", tok_json)
    special = {"bos_token": vocab.piece(bos), "eos_token": vocab.piece(vocab.eos_id),
               "unk_token": vocab.piece(vocab.unk_id)}
    if pad is not None and pad >= 0:
        special["pad_token"] = vocab.piece(pad)
    special = {k: v for k, v in special.items() if v is not None}
    _write_json(folder / "special_tokens_map.json", {k: _added(v) for k, v in special.items()})
    tok_config = {
        # PreTrainedTokenizerFast takes tokenizer.json as written; LlamaTokenizer would rebuild its own
        # pre-tokenizer and lose the SentencePiece settings (user-defined pieces, dummy prefix) kept here.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len,
        "padding_side": "left",
        # a Llama takes no token_type_ids: without this, PreTrainedTokenizerFast returns them and
        # some transformers releases refuse them in generate(**inputs)
        "model_input_names": ["input_ids", "attention_mask"],
        **special,
        # as transformers writes it; llama.cpp's converter takes the control tokens from here
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok_json["added_tokens"]},
    }
    if src.chat_template:
        tok_config["chat_template"] = src.chat_template
    _write_json(folder / "tokenizer_config.json", tok_config)


def _numpy_dtype(torch_dtype: str):
    if torch_dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return {"float32": np.float32, "float16": np.float16}[torch_dtype]


def write_peft(src: Source, folder: Path, torch_dtype: str):
    """A LoRA run's adapters as a PEFT adapter folder (llamac.formats.peft), into `folder` (new), with the
    run's tokenizer files (its chat template included), as PEFT's own adapter folders carry them."""
    from llamac.formats import peft
    folder.mkdir()
    if src.tokenizer_path is not None:
        vocab = SpmVocab.read(src.tokenizer_path)
        write_tokenizer(src, vocab, vocab.pad_id if vocab.pad_id >= 0 else _piece_id(vocab, "<|pad|>"), folder)
    _write_json(folder / "adapter_config.json", peft.adapter_config(src.lora["state"], src.config.tie_embeddings))
    tensors = {k: np.asarray(v, np.float32) for k, v in src.lora["tensors"].items()}
    write_safetensors(folder / "adapter_model.safetensors", peft.peft_tensors(tensors, src.config),
                      _numpy_dtype(torch_dtype), {"format": "pt"})


def _added(content: str, special: bool | None = None) -> dict:
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if special is not None:
        token["special"] = special
    return token


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_safetensors(path: Path, tensors: dict, dtype, metadata: dict):
    """The safetensors layout written tensor by tensor (with a progress bar for large models), each cast to
    `dtype` only as it is written: 8-byte header length, JSON header padded to 8 bytes, raw data."""
    code = SAFETENSORS_DTYPES[np.dtype(dtype).name]
    header, offset = {"__metadata__": metadata}, 0
    names = sorted(tensors)
    for name in names:
        size = int(np.prod(tensors[name].shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f, progress(offset, path.name) as bar:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            data = np.ascontiguousarray(tensors[name], dtype=dtype).reshape(-1).view(np.uint8)
            for start in range(0, data.size, 32 << 20):
                chunk = data[start:start + (32 << 20)]
                f.write(chunk.data)
                bar.update(chunk.size)
        f.flush()
        os.fsync(f.fileno())


def tokenizer_json(v: SpmVocab, add_bos: bool = True) -> dict:
    """A `tokenizers` JSON that encodes like SentencePiece (after transformers'
    SpmConverter.build_tokenizer_from_spm_proto): the model's own normalizer settings, BPE merges ranked
    by piece score, user-defined pieces isolated and never merged, byte fallback."""
    unk, types = v.piece(v.unk_id), v.export_types()
    user_defined = [p for p, t in zip(v.pieces, types) if t == USER_DEFINED]
    if v.model_type == 2:
        normal = {p: (s, i) for i, (p, s, t) in enumerate(zip(v.pieces, v.scores, v.types)) if t == NORMAL}
        ranked = [(-score, i, p[:k], p[k:]) for p, (score, i) in normal.items() for k in range(1, len(p))
                  if p[:k] in normal and p[k:] in normal]
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": v.byte_fallback,
                 "ignore_merges": bool(user_defined), "vocab": {p: i for i, p in enumerate(v.pieces)},
                 "merges": [[left, right] for _, _, left, right in sorted(ranked)]}
    elif v.model_type == 1:
        model = {"type": "Unigram", "unk_id": v.unk_id if unk is not None else None,
                 "vocab": [[p, s] for p, s in zip(v.pieces, v.scores)], "byte_fallback": v.byte_fallback}
    else:
        raise LlamacError(f"SentencePiece model type {v.model_type} is not exportable (bpe and unigram are)")

    def replace(pattern, content, regex=False):
        return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern}, "content": content}
    normalizers = []
    if v.charsmap:
        import base64
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(v.charsmap).decode()})
    if v.remove_extra_whitespaces:   # only spaces: SentencePiece leaves newlines and tabs alone
        normalizers += [replace(r"\A +| +\z", "", True), replace(" {2,}", " ", True)]
    if v.escape_whitespaces:
        normalizers.append(replace(" ", "▁"))
    if v.add_dummy_prefix:           # Metaspace adds no prefix to text already starting with "▁"; SentencePiece does
        normalizers.append(replace(r"\A▁", "▁▁", True))
    pre = []
    if v.add_dummy_prefix:
        # "always": text after a control token (the chat template's leading <s>) is encoded as if on its own,
        # as llamac encodes bos + text and llama.cpp treats text after special tokens
        pre.append({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False})
    if user_defined:                 # SentencePiece emits user-defined pieces whole, wherever they occur
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False})
    decoders = [replace("▁", " ")] + ([{"type": "ByteFallback"}] if v.byte_fallback else []) + [{"type": "Fuse"}]
    if v.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = v.piece(v.bos_id)
    single = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    specials = {}
    if add_bos and bos is not None:
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}] + single
        pair = single + [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
        specials[bos] = {"id": bos, "ids": [v.bos_id], "tokens": [bos]}
    # added tokens are cut out before normalization, and each run of text between them gets its own prefix
    added = [{"id": i, **_added(p, True)} for i, (p, t) in enumerate(zip(v.pieces, types)) if t in (UNKNOWN, CONTROL)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre} if pre else None,
        "model": model,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": decoders},
    }


# ------------------------------------------------------------------ native checkpoints

def write_llamac(src: Source, folder: Path):
    """A native checkpoint folder (model.safetensors, state.json, tokenizer.model) at `folder`, which must
    not exist yet: checkpoint.save writes it (so the format stays in one place), then it is moved here."""
    from llamac.config import Recipe
    from llamac.model.llama import Llama
    model = Llama(src.config)
    model.load_state_dict(src.state)
    state = dict(src.extra)
    state["source"] = str(src.path)
    if src.chat_template is not None:
        state["chat_template"] = src.chat_template
    state.pop("step", None)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.save-") as tmp:
        step = int(src.extra.get("step", 0))
        saved = checkpoint.save(tmp, step, model, None, Recipe(model=src.config), state,
                                tokenizer_path=src.tokenizer_path, keep=1)
        shutil.move(str(saved), str(folder))
