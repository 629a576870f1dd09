"""`llamac bench`: the sections run and report real numbers; bad sections are one-line errors."""
import pytest

from llamac.bench import bench_engine, bench_train, run_bench
from llamac.errors import LlamacError


def test_engine_section_measures_dispatch():
    rows = bench_engine("cpu", n_ops=200)
    assert {r["case"] for r in rows} >= {"raw xp add", "llamac add (recording)"}
    assert all(r["us_per_op"] > 0 for r in rows)
    raw = next(r for r in rows if r["case"] == "raw xp add")["us_per_op"]
    ours = next(r for r in rows if r["case"] == "llamac add (no graph)")["us_per_op"]
    assert ours > raw          # llamac's dispatch sits on top of NumPy's


def test_train_section_on_a_small_shape():
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, seq_len=16, batch_size=2)
    rows = bench_train("cpu", shape, steps=1, compare_torch=False)
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["params_M"] > 0


def test_unknown_section_and_gpu_only_sections():
    with pytest.raises(LlamacError, match="unknown bench section 'nope'"):
        run_bench(what="nope", device="cpu")
    with pytest.raises(LlamacError, match="GPU"):
        run_bench(what="train", device="cpu")
