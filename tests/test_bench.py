"""`llamac bench`: the sections run and report real numbers; bad sections are one-line errors."""
import math
import pytest

from llamac.bench.run import bench_engine, bench_train, run_bench
from llamac.errors import LlamacError


def test_engine_section_measures_dispatch():
    rows = bench_engine("cpu", n_ops=200)
    assert {r["case"] for r in rows} >= {"raw xp add", "llamac add (recording)"}
    assert all(math.isfinite(r["us_per_op"]) for r in rows)
    raw = next(r for r in rows if r["case"] == "raw xp add")["us_per_op"]
    ours = next(r for r in rows if r["case"] == "llamac add (no graph)")["us_per_op"]
    assert ours > raw          # llamac's dispatch sits on top of NumPy's


def test_train_section_on_a_small_shape():
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, seq_len=16, batch_size=2)
    rows = bench_train("cpu", shape, steps=1, compare_torch=False)
    assert math.isfinite(rows[0]["tokens_per_s"]) and rows[0]["params_M"] > 0


def test_unknown_section_and_gpu_only_sections():
    with pytest.raises(LlamacError, match="unknown bench section 'nope'"):
        run_bench(what="nope", device="cpu")
    with pytest.raises(LlamacError, match="GPU"):
        run_bench(what="train", device="cpu")


def test_unknown_compare_is_refused_before_anything_runs():
    with pytest.raises(LlamacError, match="unknown --compare 'pytorch'"):
        run_bench("engine", compare="pytorch")


def test_gpu_training_bench_runs_a_tiny_shape_on_the_cpu():
    # The same code path as `bench --what train --device cuda`, minus graphs and autocast.
    pytest.importorskip("torch")
    from llamac.bench.run import bench_train_gpu
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=64, seq_len=16, batch_size=2)
    rows = bench_train_gpu("tiny", shape, steps=2, warmup=1, torch_modes=("eager",), device="cpu")
    ours, theirs = rows
    assert ours["impl"].startswith("llamac") and "status" not in ours, ours
    assert math.isfinite(ours["tokens_per_s"]) and math.isfinite(ours["MFU"]) and ours["graph"] is False
    assert math.isfinite(theirs["tokens_per_s"]) and math.isfinite(ours["vs_torch_eager"])
    # both start from the same initialisation scale on the same tokens: near log(64) = 4.16
    assert abs(ours["loss"] - theirs["loss"]) < 0.2


def test_gpu_training_bench_reports_a_failure_as_a_row(monkeypatch):
    import llamac.train.loop
    from llamac.bench import run as bench

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom("CUDA out of memory allocating 9 GB")

    monkeypatch.setattr(llamac.train.loop, "TrainStep", explode)
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=64, seq_len=16, batch_size=2)
    rows = bench.bench_train_gpu("tiny", shape, steps=1, warmup=1, torch_modes=(), device="cpu")
    assert rows[0]["status"] == "OOM"


def test_the_printed_table_reads_at_80_columns():
    """Shape, implementation, headline figure and ratio only: every cell whole in an 80-column terminal."""
    import io

    from rich.console import Console
    from rich.table import Table

    from llamac.bench.run import _print_table, summary_row
    rows = [{"section": "train", "shape": "350M", "device": "cuda", "impl": "llamac (bf16)", "step_ms": 166.6,
             "tokens_per_s": 196000.0, "TFLOP_s": 420.0, "MFU": 0.48, "peak_GB": 32.28, "vs_torch_compile": 1.004,
             "graph": True, "loss": 10.4, "params_M": 350.2},
            {"section": "decode", "shape": "1B-hs64", "impl": "llamac FastDecoder", "batch": 16,
             "decode_tok_s": 7040.0, "step_ms": 2.27, "ttft_ms": 212.0, "vs_torch_graph": 0.78, "vs_batch1": 16.0}]
    assert summary_row(rows[0]) == ("350M", "llamac (bf16)", "166.6 ms/step", "1.004x vs_torch_compile")
    assert summary_row(rows[1]) == ("1B-hs64 b16", "llamac FastDecoder", "7040 tok/s", "0.78x vs_torch_graph")
    out = io.StringIO()
    _print_table(Console(file=out, width=80), Table, "train", rows)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for cell in (*summary_row(rows[0]), *summary_row(rows[1])):
        assert cell in text, cell


def test_lora_bench_runs_full_sft_then_lora_on_the_cpu():
    # The code of `bench --what lora --device cuda` (memory figures are the GPU's: none here).
    from llamac.bench.lora import bench_lora
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=64, seq_len=16, batch_size=2)
    full, adapted = bench_lora("tiny", shape, rank=4, steps=2, warmup=1, device="cpu")
    assert "status" not in full and "status" not in adapted, (full, adapted)
    assert full["impl"].startswith("llamac full SFT") and adapted["impl"].startswith("llamac LoRA r4")
    assert adapted["trainable_M"] < full["trainable_M"]
    assert math.isfinite(adapted["step_ms"]) and math.isfinite(adapted["step_vs_full"])
    assert abs(full["loss"] - adapted["loss"]) < 0.5    # the same model and tokens: near log(64) = 4.16
