"""The SentencePiece tokenizer: exact round trips, Llama's layout, models made elsewhere, training errors."""
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamac.cli import main
from llamac.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    _normalizer_spec,
    proto_fields,
    show_pieces,
    train_tokenizer,
)
from llamac.errors import LlamacError

BOTCHAN = Path(__file__).parent / "data" / "botchan_en_bpe_1000.model"
WORDS = "the king queen of and to a in that is my with not his be your thou thee love night day 1599 42".split()


def corpus(n_docs: int = 30, seed: int = 0) -> list[str]:
    """Play-like documents: capitalised lines of random words, punctuation, blank lines, numbers."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12))).capitalize() + rng.choice(list(".,?!:;"))
                 for _ in range(30)]
        docs.append(f"ACT {d}.\n\n" + "\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(corpus(), tmp_path_factory.mktemp("tok") / "play", vocab_size=400))


def test_trained_model_has_llama_layout(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert tok.special_ids == {t: 3 + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.pieces[3:11] == list(SPECIAL_TOKENS)
    assert tok.pieces[11:14] == ["<0x00>", "<0x01>", "<0x02>"]      # byte fallback pieces
    assert tok.vocab_size == len(tok.pieces) == len(tok.scores) == 400
    spec = _normalizer_spec(tok.model_proto_bytes())
    assert spec == {"name": "identity", "add_dummy_prefix": True, "remove_extra_whitespaces": False}
    trainer = dict((n, v) for n, v, _, _ in proto_fields(next(v for n, v, _, _ in proto_fields(tok.model_proto_bytes()) if n == 2)))
    assert trainer[4] == 400 and trainer[35] == 1 and trainer[10] == struct.pack("<f", 1.0)  # vocab, bytes, coverage
    assert tok.id_to_piece(tok.encode("king", bos=False)[0]).startswith("\u2581")  # the dummy prefix


def test_special_tokens_encode_to_their_single_id(tok):
    text = "<|system|>\nBe brief.<|end|>\n<|user|>\nthe king<|end|>\n<|assistant|>\nthou<|end|><|pad|>"
    ids = tok.encode(text, bos=False)
    for name, token_id in tok.special_ids.items():
        assert ids.count(token_id) == text.count(name)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", " ", "  ", "\n", "\n\n\n", " leading", "trailing  ", "a  b   c", "\t tab\r\nCRLF", "\x00\x01\x1b\x7f",
    "emoji 😀🎉👩‍👩‍👧", "漢字かなカナ한국어", "e\u0301 a\u0308 combining", "\u200b\ufeff zero width", "\u00a0nbsp",
    "\u2581", "a\u2581b", "\u2581 x", " \u2581\u2581 ", "<s></s><unk> literal control pieces", "<0x41> piece text",
    "digits 1234567890", "⁇ unk surface", "<|user|> hi", " <|end|>",
])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


TRICKY = st.lists(st.sampled_from(list(" \n\t\r\u2581ab<|>é\u0301😀漢\x00\x7f") + list(SPECIAL_TOKENS)
                                  + ["<s>", "</s>", "<unk>", "  ", "king"]), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=120) | TRICKY)
def test_decode_encode_round_trips_any_string(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_literal_space_marker_survives_where_the_library_loses_it(tok):
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    text = "a\u2581b"
    assert sp.decode(sp.encode(text)) == "a b"      # why Tokenizer.encode spells it with byte pieces
    ids = tok.encode(text, bos=False)
    assert [tok.id_to_piece(i) for i in ids if tok.id_to_piece(i).startswith("<0x")] == ["<0xE2>", "<0x96>", "<0x81>"]
    assert tok.decode(ids) == text


def test_bos_and_eos_flags(tok):
    body = tok.encode("the king", bos=False)
    assert tok.encode("the king") == [tok.bos_id] + body
    assert tok.encode("the king", bos=False, eos=True) == body + [tok.eos_id]
    assert tok.encode_batch(["the king", ""], bos=True, eos=True) == [[1] + body + [2], [1, 2]]


def test_bulk_encoding_cuts_long_texts_without_changing_ids(tok, monkeypatch):
    monkeypatch.setattr("llamac.data.tokenizer.CHUNK_CHARS", 300)   # many cuts in a short text
    long_text = " ".join(corpus(40, seed=1)) + "  double  spaces " * 100 + "\n \n  \t x" * 100
    assert len(long_text) > 100 * 300
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    texts = ["short one", long_text, "with \u2581 marker", ""]
    arrays = tok.encode_arrays(texts, num_threads=2)
    assert [a.dtype for a in arrays] == [np.int32] * 4
    assert arrays[1].tolist() == sp.encode(long_text)
    assert [a.tolist() for a in arrays] == [tok.encode(t, bos=False) for t in texts]


def test_offsets_give_each_token_its_span_of_text(tok):
    text = "<|user|>\nthe kïng 😀  x"
    ids, offsets = tok.encode_with_offsets(text, bos=True, eos=True)
    assert ids == tok.encode(text, bos=True, eos=True)
    assert offsets[0] == (0, 0) and offsets[-1] == (len(text), len(text))
    assert [o for i, o in zip(ids, offsets) if i == tok.special_ids["<|user|>"]] == [(0, 8)]
    emoji = text.index("😀")
    assert sum(o == (emoji, emoji + 1) for o in offsets) == 4     # four byte pieces, one character
    assert "".join(text[a:b] for a, b in dict.fromkeys(offsets)) == text   # the spans tile the text
    for token_id, (a, b) in zip(ids, offsets):
        if not tok.id_to_piece(token_id).startswith("<0x"):   # a whole piece spells its span
            assert tok.token_bytes(token_id) in (text[a:b].encode(), b" " + text[a:b].encode())


def test_special_encoding_cuts_at_special_pieces_and_encodes_each_run_on_its_own(tok):
    text = "<s><|user|>\nthe king<|end|>\n<|assistant|>\n thou"
    user, end, assistant = (tok.special_ids[t] for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    runs = [tok.encode(run, bos=False) for run in ("\nthe king", "\n", "\n thou")]
    expected = [tok.bos_id, user] + runs[0] + [end] + runs[1] + [assistant] + runs[2]
    assert tok.encode(text, bos=False, special=True) == expected
    assert tok.encode(text, bos=False) != expected                    # SentencePiece: one dummy prefix in all
    ids, offsets = tok.encode_with_offsets(text, bos=True, eos=True, special=True)
    assert ids == [tok.bos_id] + expected + [tok.eos_id]
    assert offsets[1] == (0, 3) and offsets[2] == (3, 11)            # the literal <s>, then <|user|>
    assert "".join(text[a:b] for a, b in dict.fromkeys(offsets)) == text
    assert tok.encode("the king", special=True) == tok.encode("the king")   # no special piece: no change


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TRICKY)
def test_special_encoding_offsets_agree_with_encode(tok, text):
    ids, offsets = tok.encode_with_offsets(text, bos=False, special=True)
    assert ids == tok.encode(text, bos=False, special=True) and len(offsets) == len(ids)
    assert "".join(text[a:b] for a, b in dict.fromkeys(offsets)) == text


def test_token_bytes_spell_the_text_after_the_dummy_space(tok):
    text = "Thou  art\nthe queen é"
    spelled = b"".join(tok.token_bytes(i) for i in tok.encode(text, eos=True))
    assert spelled == b" " + text.encode()


def test_loads_a_model_made_elsewhere_and_encodes_like_sentencepiece():
    tok = Tokenizer(BOTCHAN)
    sp = spm.SentencePieceProcessor(model_file=str(BOTCHAN))
    assert tok.vocab_size == 1000 and tok.special_ids == {}
    assert tok.pieces == [sp.id_to_piece(i) for i in range(1000)]
    assert tok.scores == pytest.approx([sp.get_score(i) for i in range(1000)])
    texts = ["I am a cat.", "Hello world!  Two  spaces.", "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ", "The master said: 'Botchan, 1906'",
             "", "\u2581 literal", "unknown 漢字 chars", "line\nbreaks\ttabs"]
    for text in texts:
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode_batch(texts, bos=False) == sp.encode(texts)


def test_model_bytes_make_the_same_tokenizer(tok):
    again = Tokenizer.from_bytes(tok.model_proto_bytes())
    assert tok.model_proto_bytes() == Path(tok.path).read_bytes()
    assert again.encode("the \u2581 queen 😀") == tok.encode("the \u2581 queen 😀")
    assert again.path is None and again.vocab_size == tok.vocab_size


def test_training_is_deterministic_and_reads_files(tmp_path):
    first = train_tokenizer(corpus(10), tmp_path / "a", vocab_size=350)
    files = []
    for i, doc in enumerate(corpus(10)):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc)
    second = train_tokenizer(files, tmp_path / "b", vocab_size=350)
    assert Path(first).read_bytes() == Path(second).read_bytes()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("vocab_size, words", [(5000, "too large for"), (100, "too small")])
def test_vocabulary_size_the_data_cannot_support_is_one_clear_error(tmp_path, vocab_size, words):
    with pytest.raises(LlamacError) as err:
        train_tokenizer(corpus(2), tmp_path / "t", vocab_size=vocab_size)
    assert words in str(err.value) and "tokenizer.vocab_size" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "t.model").exists()


def test_missing_inputs_are_errors(tmp_path):
    with pytest.raises(LlamacError, match="no text"):
        train_tokenizer([], tmp_path / "t", vocab_size=300)
    with pytest.raises(LlamacError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", vocab_size=300)
    with pytest.raises(LlamacError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model at all")
    with pytest.raises(LlamacError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    assert tok.decode(np.array(tok.encode("the king"))) == "the king"
    with pytest.raises(LlamacError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(LlamacError, match="outside the vocabulary"):
        tok.id_to_piece(-1)


def test_show_pieces_from_the_command_line(tok, capsys):
    main(["tokenize", "--text", "the king<|end|>", "--tokenizer", tok.path])
    out = capsys.readouterr().out
    ids = tok.encode("the king<|end|>", bos=False)
    assert str(ids) in out and "'<|end|>'" in out and f"{len(ids)} tokens for 15 bytes" in out
    assert show_pieces("", tok.path) == []
