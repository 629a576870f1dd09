"""`llamac eval`: the batched scorer against unbatched and direct computations and transformers, bits per
byte against the validation loss, the JSONL shapes and their errors, the built-in set, the tasks in training."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import llamac
from llamac.cli import main
from llamac.config import load_recipe
from llamac.errors import LlamacError
from llamac.eval.bpb import bits_per_byte
from llamac.eval.choice import choice_pairs, item_from_row, read_items, score_items
from llamac.eval.loglik import Pair, encode_pair, score_pairs
from llamac.eval.tasks import parse_tasks
from llamac.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "pretrain" / "debug.yaml"
TEXTS = ["The king walked into the garden, and the queen followed him.\n",
         "Enter HAMLET. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. " * 3,
         "A short line — with a dash, and café."]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The debug recipe trained for 30 steps (2 layers, dim 64, context 64): a llamac checkpoint."""
    from llamac.train.loop import pretrain
    out = tmp_path_factory.mktemp("eval") / "run"
    pretrain(load_recipe(DEBUG, [f"out_dir={out}", "train.max_steps=30", "train.eval_every=0", "train.ckpt_every=0",
                                 "train.sample_tokens=0", "train.log_every=10"]))
    return out


@pytest.fixture(scope="module")
def loaded(run):
    model, tokenizer, ckpt = load_model(run)
    return model.eval(), tokenizer, ckpt


def _direct_logprob(model, pair: Pair) -> float:
    """log p(continuation | context) from one plain forward over the whole (fitting) sequence."""
    ids = list(pair.context) + list(pair.continuation)
    with llamac.no_grad():
        logits = model(np.array([ids[:-1]]))[0].numpy()[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    n = len(pair.continuation)
    return float(sum(logp[len(ids) - 1 - n + j, t] for j, t in enumerate(pair.continuation)))


def _pairs(tokenizer):
    texts = [("The king", " walked into the garden."), ("", "Hamlet"), ("To be, or not to be, ", "that is it"),
             (TEXTS[1][:200], " the end"), ("a", " b c d e f g h i j k l m n o p q r s t u v w x y z " * 3)]
    return [encode_pair(tokenizer, c, x) for c, x in texts]


def test_batched_scores_equal_unbatched_and_direct(loaded):
    model, tokenizer, _ = loaded
    pairs = _pairs(tokenizer)
    assert len(pairs[3].context) + len(pairs[3].continuation) > 65     # cut from the left
    assert len(pairs[4].continuation) > 64                             # scored in pieces
    together = score_pairs(model, pairs, batch_tokens=100_000)
    small = score_pairs(model, pairs, batch_tokens=48)
    alone = [score_pairs(model, [p])[0] for p in pairs]
    for a, b, c in zip(together, small, alone):
        assert a.n_tokens == b.n_tokens == c.n_tokens
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5) == pytest.approx(c.logprob, rel=1e-5)
        assert a.greedy == b.greedy == c.greedy
    for pair, score in list(zip(pairs, together))[:3]:                  # the ones that fit
        assert score.logprob == pytest.approx(_direct_logprob(model, pair), rel=1e-5)
    assert all(s.logprob < 0 for s in together)


def test_the_gpus_rounded_batch_widths_and_head_chunks_change_no_score(loaded, monkeypatch):
    from llamac.eval import loglik
    model, tokenizer, _ = loaded
    pairs = _pairs(tokenizer)
    plain = score_pairs(model, pairs, batch_tokens=96)
    monkeypatch.setitem(loglik.WIDTH_MULTIPLE, "cpu", 32)
    monkeypatch.setitem(loglik.HEAD_MULTIPLE, "cpu", 512)
    monkeypatch.setattr(loglik, "HEAD_ROWS", 1024)
    assert {b.ids.shape[1] % 32 for b in loglik.plan_batches(pairs, 64, 96, 32)} == {0}
    rounded = score_pairs(model, pairs, batch_tokens=96)
    for a, b in zip(plain, rounded):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5) and a.greedy == b.greedy


def test_encode_pair_moves_trailing_spaces_and_handles_an_empty_context(loaded):
    _, tokenizer, _ = loaded
    pair = encode_pair(tokenizer, "The king ", "walked")
    assert pair == encode_pair(tokenizer, "The king", " walked")
    assert list(pair.context) == tokenizer.encode("The king", bos=True)
    assert encode_pair(tokenizer, "", "The").context == (tokenizer.bos_id,)


def test_bpb_is_the_validation_loss_in_bits_per_byte(loaded):
    """bpb == mean loss (nats/token) x tokens / (bytes x ln 2), the loss from the model's own
    cross-entropy over windows of the text built here."""
    model, tokenizer, _ = loaded
    result = bits_per_byte(model, tokenizer, TEXTS)
    L = model.config.max_seq_len
    total, count = 0.0, 0
    for text in TEXTS:
        tokens = tokenizer.encode(text, bos=False)
        for start in range(0, len(tokens), L):
            y = tokens[start:start + L]
            x = ([tokenizer.bos_id] + tokens[:L - 1]) if start == 0 else tokens[start - 1:start - 1 + len(y)]
            with llamac.no_grad():
                loss = float(model(np.array([x[:len(y)]]), np.array([y]))[1].item())
            total += loss * len(y)
            count += len(y)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert result["tokens"] == count and result["bytes"] == n_bytes
    assert result["bpb"] == pytest.approx((total / count) * count / (n_bytes * math.log(2)), rel=1e-6)
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)


def test_transformers_gives_the_same_log_likelihoods(tmp_path, loaded, run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llamac.formats.export import export
    model, tokenizer, _ = loaded
    hf = export(run, format="hf", out=tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    pairs = _pairs(tokenizer)[:4]
    ours = score_pairs(model, pairs)
    L = model.config.max_seq_len
    for pair, score in zip(pairs, ours):
        ids = (list(pair.context) + list(pair.continuation))[-(L + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        n = len(pair.continuation)
        theirs = sum(float(logp[len(ids) - 1 - n + j, t]) for j, t in enumerate(ids[-n:]))
        assert abs(score.logprob - theirs) <= 1e-4 * abs(theirs)


def test_multiple_choice_accuracy_follows_the_log_likelihoods(loaded):
    model, tokenizer, _ = loaded
    items = [item_from_row({"context": "To be, or not to be,", "choices": ["that is the question", "xq zz", "of"],
                            "label": i % 3}, f"row {i}") for i in range(3)]
    result = score_items(model, tokenizer, items)
    lls = np.array(result["loglikelihoods"])
    assert result["acc"] == pytest.approx(np.mean([np.argmax(ll) == it.label for ll, it in zip(lls, items)]))
    chars = np.array([len(c) for c in items[0].choices])
    assert result["acc_norm"] == pytest.approx(np.mean([np.argmax(ll / chars) == it.label for ll, it in zip(lls, items)]))
    pairs = choice_pairs(tokenizer, items[:1])
    assert [p.continuation for p in pairs] == [encode_pair(tokenizer, items[0].context, " " + c).continuation
                                               for c in items[0].choices]


def test_the_common_jsonl_shapes(tmp_path):
    rows = [
        {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "activity_label": "Roof shingle removal",
         "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing [title] on a roof."],
         "label": "1"},
        {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"context": "Roses are", "choices": ["red", "loud"], "label": 0},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    hella, arc, piqa, mmlu, generic = read_items(path)
    assert hella.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella.choices[1] == "starts pulling up roofing. on a roof." and hella.label == 1
    assert arc.context == "Question: Which is a gas?\nAnswer:" and arc.choices == ("ice", "steam", "rock")
    assert arc.label == 1
    assert piqa.context == "Question: Open a jar\nAnswer:" and piqa.choices == ("twist the lid", "eat the lid")
    assert mmlu.context == "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" and mmlu.choices == ("A", "B", "C", "D")
    assert mmlu.label == 1 and generic.label == 0


@pytest.mark.parametrize("content, needle", [
    ('{"context": "x", "label": 0}\n', ":1: no choices"),
    ('{"context": "x", "choices": ["a", "b"], "label": 0}\n{"context": "x", "choices": ["a", "b"], "label": 2}\n',
     ":2: label 2 out of range for 2 choices"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}\n', ":1: label 'E'"),
    ("", ": empty file"),
    ("\n\n", ": empty file"),
    ('{"text": "just text"}\n', ":1: no choices: not a multiple-choice row"),
    ('{"context": "x", "choices": ["a", "b"], "label": 0}\nnot json\n', ":2: not valid JSON"),
])
def test_bad_multiple_choice_files_are_one_line_errors(tmp_path, capsys, run, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LlamacError, match=None) as info:
        read_items(path)
    assert f"{path}{needle}" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit):
        main(["eval", "-c", str(run), "--tasks", f"mc:{path}", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_unknown_task_and_missing_file_are_one_line_errors(tmp_path, capsys, run):
    with pytest.raises(LlamacError, match="unknown eval task 'hellaswag'; choose from bpb"):
        parse_tasks("bpb,hellaswag")
    for tasks, needle in (("nope", "unknown eval task 'nope'"), (f"mc:{tmp_path}/missing.jsonl", "file not found")):
        with pytest.raises(SystemExit):
            main(["eval", "-c", str(run), "--tasks", tasks, "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_bpb_without_text_is_a_one_line_error(tmp_path, capsys, run):
    from llamac.formats.export import export
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    hf = export(run, format="hf", out=tmp_path / "hf")
    capsys.readouterr()
    for checkpoint, tasks, needle in ((run, f"bpb:{empty}", f"bpb: {empty}: empty"),
                                      (hf, "bpb", "has no run recipe to take the validation split from")):
        with pytest.raises(SystemExit):
            main(["eval", "-c", str(checkpoint), "--tasks", tasks, "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_eval_command_table_and_json(tmp_path, capsys, run):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": "The king", "choices": [" said", " xq"], "label": 0}) + "\n"
                             for _ in range(3)))
    out = tmp_path / "results.json"
    main(["eval", "-c", str(run), "--tasks", f"bpb,next_sentence,skills,{items}", "--limit", "8", "--json", str(out),
          "--device", "cpu"])
    table = capsys.readouterr().out
    assert "next_sentence" in table and "bpb" in table and "exact_match" in table
    results = json.loads(out.read_text())["tasks"]
    assert set(results) == {"bpb", "next_sentence", "skills", "items"}
    assert 0 < results["bpb"]["bpb"] < 10 and results["bpb"]["documents"] <= 8
    assert results["next_sentence"]["n"] == 8 and 0 <= results["next_sentence"]["acc"] <= 1
    assert results["skills"]["n"] == 8 and results["items"]["n"] == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_bpb_default_text_is_the_runs_validation_split(loaded, run):
    from llamac.data.pipeline import load_documents, split_documents
    from llamac.eval.bpb import validation_texts
    recipe = load_recipe(DEBUG)
    train, val = split_documents(load_documents(recipe.data.sources, recipe.data), recipe.data.val_fraction,
                                 recipe.seed)
    _, _, ckpt = loaded
    assert validation_texts(ckpt) == [t for _, t in val] and val


def test_next_sentence_is_fixed_held_out_and_well_formed():
    from llamac.eval.builtin import heldout_documents, next_sentence_items
    items = next_sentence_items()
    assert len(items) == 500 and all(len(i.choices) == 4 and len(set(i.choices)) == 4 for i in items)
    labels = np.bincount([i.label for i in items], minlength=4)
    assert labels.min() > 80                                           # the answer's place is drawn
    from llamac.eval.builtin import sentences
    docs = [sentences(text) for _, text in heldout_documents()]
    follows = {(" ".join(s[i - 2:i]), s[i]) for s in docs for i in range(2, len(s))}
    assert all((i.context, i.choices[i.label]) in follows for i in items)     # the true next sentence
    assert not any((i.context, c) in follows for i in items for k, c in enumerate(i.choices) if k != i.label)
    next_sentence_items.cache_clear()
    assert next_sentence_items() == items


def test_train_eval_tasks_are_checked_logged_and_plotted(tmp_path):
    from llamac.train.loop import pretrain
    with pytest.raises(LlamacError, match="recipe key 'train.eval_tasks': unknown eval task 'hellaswag'"):
        load_recipe(DEBUG, ["train.eval_tasks=[bpb, hellaswag]"])
    with pytest.raises(LlamacError, match="train.eval_limit' must be >= 1"):
        load_recipe(DEBUG, ["train.eval_limit=0"])
    out = tmp_path / "run"
    recipe = load_recipe(DEBUG, [f"out_dir={out}", "train.max_steps=10", "train.eval_every=5", "train.ckpt_every=0",
                                 "train.sample_tokens=0", "train.eval_tasks=[bpb, next_sentence]",
                                 "train.eval_limit=4", "train.warmup_steps=2"])
    pretrain(recipe)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(0 < r["bpb"] < 10 and 0 <= r["next_sentence/acc"] <= 1 and "next_sentence/acc_norm" in r
               for r in evals)
    from llamac.train.plot import task_series
    assert set(task_series(evals)) == {"bpb", "next_sentence/acc", "next_sentence/acc_norm"}
    assert (out / "loss.png").stat().st_size > 0


def test_eval_bench_scores_the_same_as_pytorch_on_the_cpu():
    pytest.importorskip("torch")
    from llamac.bench.eval import bench_eval
    ours, theirs = bench_eval("tiny", n_items=6, device="cpu", dtype="fp32", max_seq_len=256)
    assert ours["pairs"] == theirs["pairs"] == 24
    assert ours["max_rel_diff_vs_torch"] < 1e-5
    assert math.isfinite(ours["seconds"]) and math.isfinite(ours["vs_torch_eager"])


# ------------------------------------------------------------------ lm-evaluation-harness

TASK_YAMLS = {
    "llamac_test_mc": "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
                      "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "llamac_test_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n",
    "llamac_test_generate": "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: answer\n"
                            "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
                            "metric_list:\n  - metric: exact_match\n",
}


def _local_task(folder: Path, name: str, rows: list) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\n{TASK_YAMLS[name]}")


def _greedy_until(model, tokenizer, context: str, stop: str, n: int) -> str:
    from llamac.infer.chat import END_OF_TURN
    from llamac.infer.generate import generate_ids
    ids = tokenizer.encode(context, bos=True)
    made, text = [], ""
    for token in generate_ids(model, ids, n, temperature=0, eos_id=tokenizer.eos_id,
                              stop_ids=(tokenizer.piece_to_id(END_OF_TURN),)):
        made.append(token)
        text = tokenizer.decode(ids + made)[len(tokenizer.decode(ids)):]
        if stop in text:
            return text[:text.find(stop)]
    return text


def test_lm_evaluation_harness_through_the_adapter_agrees_with_llamac(tmp_path, loaded, run):
    """lm-eval itself (its CLI, offline, on tasks defined over local JSONL files) runs the three request
    types on llamac's engine: multiple choice gives llamac's own accuracy, rolling log-likelihood its
    bits per byte, generation its greedy text; and lm-eval's Hugging Face model on the transformers
    export gives llamac's log-likelihoods."""
    pytest.importorskip("lm_eval")
    import os
    import subprocess
    import sys
    from llamac.eval.builtin import next_sentence_items
    model, tokenizer, _ = loaded
    items = list(next_sentence_items())[:40]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks, "llamac_test_mc", [{"context": i.context, "choices": list(i.choices), "label": i.label}
                                          for i in items])
    _local_task(tasks, "llamac_test_rolling", [{"text": t} for t in TEXTS])
    prompts = ["The king said", "To be, or not", "Enter HAMLET"]
    _local_task(tasks, "llamac_test_generate", [{"context": p, "answer": "x"} for p in prompts])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hfd")}
    done = subprocess.run([sys.executable, "-m", "llamac.eval.harness", "--model", "llamac", "--model_args",
                           f"checkpoint={run}", "--device", "cpu", "--tasks",
                           "llamac_test_mc,llamac_test_rolling,llamac_test_generate", "--include_path", str(tasks),
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    ours = score_items(model, tokenizer, items)
    assert results["llamac_test_mc"]["acc,none"] == pytest.approx(ours["acc"])
    assert results["llamac_test_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert 0 < ours["acc"] < 1
    bpb = bits_per_byte(model, tokenizer, TEXTS)["bpb"]
    assert results["llamac_test_rolling"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)
    samples = [json.loads(ln) for ln in next((tmp_path / "out").rglob("samples_llamac_test_generate_*.jsonl"))
               .read_text().splitlines()]
    got = {s["doc"]["context"]: s["filtered_resps"][0] for s in samples}
    assert got == {p: _greedy_until(model, tokenizer, p, ".", 8) for p in prompts}

    # lm-eval's own Hugging Face model on the transformers export scores the same choices alike (short
    # items: its model asserts that a choice fits the context)
    from llamac.formats.export import export
    short = [{"context": c, "choices": [" " + w for w in ("the king", "a queen", "and so", "xq zy")], "label": 0}
             for c in ("The king said to", "To be, or not to be,", "Enter HAMLET", "O Romeo, Romeo,", "And the")]
    (tasks / "llamac_test_mc.yaml").unlink()
    _local_task(tasks, "llamac_test_mc", short)
    hf = export(run, format="hf", out=tmp_path / "hf")
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf},dtype=float32", "--device", "cpu", "--tasks", "llamac_test_mc",
                           "--include_path", str(tasks), "--output_path", str(tmp_path / "out_hf"), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(ln) for ln in next((tmp_path / "out_hf").rglob("samples_llamac_test_mc_*.jsonl"))
               .read_text().splitlines()]
    theirs = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    ours = score_items(model, tokenizer, [item_from_row(r, "short") for r in short])
    assert len(theirs) == len(short)
    for k, lls in enumerate(ours["loglikelihoods"]):
        assert np.allclose(lls, theirs[k], rtol=1e-4, atol=0), k


def test_importing_the_adapter_registers_the_model_type():
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from llamac.eval.harness import LlamacLM
    assert get_model("llamac") is LlamacLM
    with pytest.raises(LlamacError, match="checkpoint=PATH"):
        LlamacLM()


def test_skills_subsets_cover_every_task_and_the_whole_set_is_sfts():
    from llamac.data.instruct import SKILLS, skill_split
    from llamac.eval.skills import heldout_skills
    assert {ex["task"] for ex in heldout_skills(1337, len(SKILLS))} == set(SKILLS)
    whole = heldout_skills(1337)
    assert sorted(map(repr, whole)) == sorted(map(repr, skill_split(seed=1337)[1]))


def test_the_harness_script_without_lm_eval_says_how_to_get_it():
    import subprocess
    import sys
    code = ("import sys; sys.modules['lm_eval'] = None; sys.modules['lm_eval.api'] = None\n"
            "from llamac.eval.launch import harness_main; harness_main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: the lm-evaluation-harness adapter needs lm-eval: pip install 'llamac[eval]'"
