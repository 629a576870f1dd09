"""`llamac eval` on the GPU: the batched scorer against the fp32 CPU one, its batch independence in bf16,
the eval bench against PyTorch, and the skills' batched greedy decoding."""
import math

import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig
from llamac.eval.loglik import Pair, score_pairs
from llamac.model.llama import Llama


def _model(device, dtype=None, **kw):
    cfg = ModelConfig(**{**dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, max_seq_len=96,
                                hidden_dim=256), **kw})
    llamac.manual_seed(0)
    return Llama(cfg).to(device, dtype).eval()


def _pairs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [Pair((1,) + tuple(rng.integers(3, 500, rng.integers(1, 80)).tolist()),
                 tuple(rng.integers(3, 500, rng.integers(1, 30)).tolist())) for _ in range(n)]


def test_gpu_scores_match_the_cpu_in_fp32_and_bf16():
    pairs = _pairs()
    cpu = np.array([s.logprob for s in score_pairs(_model("cpu"), pairs)])
    gpu = np.array([s.logprob for s in score_pairs(_model("cuda"), pairs)])
    bf16 = np.array([s.logprob for s in score_pairs(_model("cuda", "bfloat16"), pairs)])
    assert np.max(np.abs(gpu - cpu) / np.abs(cpu)) < 1e-4
    assert np.max(np.abs(bf16 - cpu) / np.abs(cpu)) < 3e-2


def test_bf16_scores_do_not_depend_on_the_batch():
    model = _model("cuda", "bfloat16")
    pairs = _pairs(40, seed=1)
    together = np.array([s.logprob for s in score_pairs(model, pairs, batch_tokens=1 << 16)])
    small = np.array([s.logprob for s in score_pairs(model, pairs, batch_tokens=200)])
    alone = np.array([score_pairs(model, [p])[0].logprob for p in pairs[:8]])
    assert np.max(np.abs(together - small) / np.abs(together)) < 1e-2
    assert np.max(np.abs(together[:8] - alone) / np.abs(alone)) < 1e-2


def test_eval_bench_runs_on_the_gpu_and_agrees_with_pytorch():
    pytest.importorskip("torch")
    from llamac.bench.eval import bench_eval
    ours, theirs = bench_eval("tiny", n_items=50, device="cuda", dtype="bf16")
    assert ours["pairs"] == theirs["pairs"] == 200
    assert ours["max_rel_diff_vs_torch"] < 5e-2
    assert math.isfinite(ours["seconds"]) and math.isfinite(ours["vs_torch_eager"])


def test_skills_batched_on_the_gpu_report_every_prompt(tmp_path):
    from llamac.data.instruct import skill_split
    from llamac.data.tokenizer import Tokenizer, train_tokenizer
    from llamac.eval.skills import exact_match
    rng = np.random.default_rng(0)
    words = "what is add and the sum of reverse list sort these numbers count letters repeat exactly".split()
    lines = [" ".join(rng.choice(words, 10)) + f" {rng.integers(0, 13)} + {rng.integers(0, 13)}?" for _ in range(3000)]
    tok = Tokenizer(train_tokenizer(lines, tmp_path / "tok", vocab_size=400))
    model = _model("cuda", "bfloat16", vocab_size=tok.vocab_size, max_seq_len=128)
    examples = skill_split(seed=1337)[1][:20]
    result = exact_match(model, tok, examples)
    assert result["n"] == 20 and 0 <= result["exact_match"] <= 1 and 0 <= result["ended_turn"] <= 1
