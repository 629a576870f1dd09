"""GGUF v3 for llama.cpp, written with the gguf package (the format's reference Python writer).

llama.cpp's llama architecture rotates interleaved pairs (2i, 2i+1) like Meta's code: its converter
permutes Hugging Face q/k rows back to that layout, which is llamac's own, so wq/wk go in unchanged.
The vocabulary is the SentencePiece model's, with scores and token types, for llama.cpp's "llama"
(SentencePiece) tokenizer, the chat tokens typed CONTROL and <|end|> its end-of-turn token;
tests/test_export.py checks the ids, greedy continuations and chat completions.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llamac.errors import LlamacError
from llamac.formats.hf_import import Source
from llamac.formats.spm import PROGRESS_BYTES, UNUSED, SpmVocab
from llamac.model.llama import rope_inv_freq

LAYER_TENSORS = {  # llamac name inside layers.N -> gguf.MODEL_TENSOR member
    "attention.wq.weight": "ATTN_Q", "attention.wk.weight": "ATTN_K", "attention.wv.weight": "ATTN_V",
    "attention.wo.weight": "ATTN_OUT", "feed_forward.w1.weight": "FFN_GATE", "feed_forward.w2.weight": "FFN_DOWN",
    "feed_forward.w3.weight": "FFN_UP", "attention_norm.weight": "ATTN_NORM", "ffn_norm.weight": "FFN_NORM",
}
TOP_TENSORS = {"tok_embeddings.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "output.weight": "OUTPUT"}


def gguf_name(name: str) -> str:
    import gguf
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[LAYER_TENSORS[rest]]].format(bid=int(i)) + ".weight"
    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[TOP_TENSORS[name]]] + ".weight"


def write_gguf(src: Source, path: Path, dtype: str):
    import gguf
    cfg = src.config
    vocab = SpmVocab.read(src.tokenizer_path)
    if len(vocab.pieces) > cfg.vocab_size:
        raise LlamacError(f"tokenizer has {len(vocab.pieces)} pieces but the model only {cfg.vocab_size} embeddings")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(src))
    w.add_file_type(file_type)
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    if cfg.head_size != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_size)
        w.add_value_length(cfg.head_size)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_vocab_size(cfg.vocab_size)
    rope_freqs = _rope_scaling(w, cfg, cfg.head_size)

    _add_vocab(w, vocab, cfg.vocab_size)
    if src.chat_template:
        w.add_chat_template(src.chat_template)

    total = 0
    for name in sorted(src.state):
        data, raw = _encode(src.state[name], dtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
        total += data.nbytes
    if rope_freqs is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=total >= PROGRESS_BYTES)
    w.close()


def _model_name(src: Source) -> str:
    path = Path(src.path)
    # a checkpoint folder is named step_N inside <run>/checkpoints: the run names the model
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def _encode(w: np.ndarray, dtype: str):
    """(array, raw GGML type or None) as llama.cpp's converter stores it: norms (1-D) stay F32;
    Q8_0 needs rows in blocks of 32 and falls back to F16 otherwise."""
    import gguf
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or dtype == "f32":
        return w, None
    if dtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


def _rope_scaling(w, cfg, head_dim: int):
    """llama.cpp keys for linear scaling; llama3 scaling as a rope_freqs tensor of per-frequency divisors
    (what its converter writes); dynamic NTK has no llama.cpp equivalent and is dropped with a warning."""
    import gguf
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if not kind or kind == "default":
        return None
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "llama3":
        base = rope_inv_freq(type(cfg)(rope_theta=cfg.rope_theta), head_dim, 1)
        scaled = rope_inv_freq(cfg, head_dim, 1)
        return (base / scaled).astype(np.float32)
    print(f"warning: rope scaling {kind!r} is not supported by llama.cpp; the GGUF uses unscaled RoPE, "
          f"exact up to the original context length", file=sys.stderr)
    return None


def _add_vocab(w, vocab: SpmVocab, n_vocab: int):
    """The whole SentencePiece vocabulary; embedding rows beyond it get unused [PADn] tokens as in
    llama.cpp's converter, since llama.cpp wants one token per row."""
    pieces, scores, types = list(vocab.pieces), list(vocab.scores), vocab.export_types()
    for i in range(len(pieces), n_vocab):
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    if vocab.remove_extra_whitespaces or vocab.charsmap:
        print("warning: the tokenizer normalizes text (extra whitespace removal or a character map), which "
              "llama.cpp's SentencePiece tokenizer does not: ids may differ on such text", file=sys.stderr)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.bos_id >= 0:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id >= 0:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.end_of_turn_id is not None:   # llama.cpp ends generation at eos and eot both
        w.add_eot_token_id(vocab.end_of_turn_id)
    pad = vocab.pad_id if vocab.pad_id >= 0 else (pieces.index("<|pad|>") if "<|pad|>" in pieces else -1)
    if pad >= 0:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(vocab.bos_id >= 0)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_dummy_prefix)
