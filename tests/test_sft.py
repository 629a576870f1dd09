"""SFT: the chat template, the loss mask, packing isolation, data errors and the skill tasks."""
import json
import re

import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig
from llamac.data.instruct import SKILLS, skill_example, skill_split
from llamac.errors import LlamacError
from llamac.infer.chat import END_OF_TURN, encode_chat, render
from llamac.model.llama import Llama
from llamac.train.sft import IGNORE, batch_arrays, pack, read_sft_file

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8, of course."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llamac.data.tokenizer import Tokenizer, train_tokenizer
    rng = np.random.default_rng(0)
    words = "the a king queen what is and of to in you are terse course number letters reverse list".split()
    lines = [" ".join(rng.choice(words, 12)) + f" {rng.integers(0, 100)} + {rng.integers(0, 100)}?" for _ in range(3000)]
    path = train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "sft", vocab_size=400)
    return Tokenizer(path)


def test_render_marks_only_assistant_turns():
    text, spans = render(CONV, bos="")
    assert text.startswith("<|system|>\nYou are terse.<|end|>\n<|user|>\n")
    assert [text[a:b] for a, b in spans] == ["5" + END_OF_TURN, "8, of course." + END_OF_TURN]


def test_encode_chat_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, mask = encode_chat(tokenizer, CONV)
    assert ids[0] == tokenizer.bos_id
    marked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "5" + END_OF_TURN + "8, of course." + END_OF_TURN
    text = render(CONV, bos="")[0]
    assert ids == tokenizer.encode(text, special=True)
    # each run of text after a chat token is encoded on its own: decode shows its dummy-prefix space
    assert tokenizer.decode(ids) == re.sub(r"(<\|\w+\|>)(?=.)", r"\1 ", text, flags=re.S)
    end = tokenizer.piece_to_id(END_OF_TURN)
    assert sum(1 for i in ids if i == end) == 5            # <|end|> is one token


def _tiny_model(vocab):
    llamac.manual_seed(0)
    return Llama(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=128))


def test_loss_mask_zero_loss_and_gradient_off_assistant_tokens(tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    packed = pack([encode_chat(tokenizer, CONV), encode_chat(tokenizer, short)], seq_len=127, pad_id=tokenizer.eos_id)
    assert len(packed.tokens) == 1 and (packed.segments[0] == -1).any()   # both in one row, then padding
    x, y, seg = batch_arrays(packed, np.array([0]))
    model = _tiny_model(tokenizer.vocab_size)
    with llamac.no_grad():
        logits, _ = model(x, segment_ids=seg)
    leaf = llamac.Tensor(logits.data, requires_grad=True)
    loss = llamac.cross_entropy(leaf, y)
    loss.backward()
    row_grad = np.abs(leaf.grad[0]).sum(-1)
    counted = y[0] != IGNORE
    assert np.all(row_grad[~counted] == 0) and np.all(row_grad[counted] > 0)
    # exactly the assistant tokens of both examples (and nothing across the boundary or in padding) count
    assert tokenizer.decode(y[0][counted].tolist()) == "5<|end|>8, of course.<|end|>Hello.<|end|>"
    n_pad = int((packed.segments[0] == -1).sum())
    assert np.all(y[0, -n_pad:] == IGNORE)


def test_packed_examples_do_not_see_each_other(tokenizer):
    a = encode_chat(tokenizer, CONV)
    b = encode_chat(tokenizer, [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "queen"}])
    b2 = encode_chat(tokenizer, [{"role": "user", "content": "a list"}, {"role": "assistant", "content": "reverse"}])
    model = _tiny_model(tokenizer.vocab_size)

    def logits_of(examples):
        packed = pack(examples, seq_len=127, pad_id=tokenizer.eos_id)
        x, _, seg = batch_arrays(packed, np.arange(len(packed.tokens)))
        with llamac.no_grad():
            return model(x, segment_ids=seg)[0].numpy(), packed

    both, _ = logits_of([a, b])
    changed, _ = logits_of([a, b2])
    n = len(a[0])
    assert np.array_equal(both[0, :n], changed[0, :n])          # a is blind to what follows it
    alone, _ = logits_of([b])
    m = len(b[0])
    assert np.allclose(both[0, n:n + m], alone[0, :m], atol=1e-4)   # b as if alone (RoPE is relative)


def test_over_long_examples_are_truncated_and_counted(tokenizer):
    long = encode_chat(tokenizer, [{"role": "user", "content": "the king " * 40}, {"role": "assistant", "content": "a"}])
    fits = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the queen " * 3}])
    packed = pack([long, fits], seq_len=31, pad_id=0)
    assert packed.truncated == 1 and packed.dropped == 1     # the long one lost its answer: dropped
    assert packed.tokens.shape == (1, 32)


@pytest.mark.parametrize("content,needle", [
    ('{"instruction": "a", "output": "b"}\n{not json}\n', ":2: not valid JSON"),
    ('{"instruction": "x"}\n', ":1: missing field 'output'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', ":1: unknown role 'robot'"),
    ("", ": empty file"),
])
def test_malformed_sft_files_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(LlamacError) as err:
        read_sft_file(path)
    assert str(err.value).startswith(str(path) + needle), str(err.value)


def test_alpaca_and_chat_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "Add", "input": "2 and 2", "output": "4"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = read_sft_file(path)
    assert examples[0]["messages"][0]["content"] == "Add\n\n2 and 2"
    assert examples[1]["messages"][1]["content"] == "Hello"


def test_skill_split_is_fixed_and_disjoint():
    train, heldout = skill_split(200, 20)
    train2, heldout2 = skill_split(200, 20)
    assert heldout == heldout2
    prompts = {e["messages"][0]["content"] for e in heldout}
    assert not prompts & {e["messages"][0]["content"] for e in train}
    assert {e["task"] for e in heldout} == set(SKILLS)


def test_skill_answers_are_right():
    import random
    rng = random.Random(0)
    for _ in range(50):
        p, a = skill_example("add", rng)
        x, y = map(int, re.findall(r"\d+", p))
        assert int(a) == x + y
        p, a = skill_example("subtract", rng)
        x, y = map(int, re.findall(r"\d+", p))
        assert int(a) == (y - x if p.startswith("Subtract") else x - y) >= 0
        p, a = skill_example("sort", rng)
        nums = [int(v) for v in p.split(": ")[1].split(", ")]
        assert a == ", ".join(map(str, sorted(nums)))
        p, a = skill_example("convert", rng)
        assert a.split()[-1] in p


def test_sft_end_to_end_on_the_debug_recipes(tmp_path):
    """pretrain debug -> sft debug through the CLI: evaluation before/after, template stored, chat works."""
    from tests.test_train import DEBUG, ROOT, run_cli
    base = tmp_path / "base"
    pre = run_cli("pretrain", DEBUG, "--set", f"out_dir={base}", "--set", "train.max_steps=30",
                  "--set", "train.sample_tokens=0")
    assert pre.returncode == 0, pre.stderr
    out = tmp_path / "sft"
    res = run_cli("sft", ROOT / "recipes" / "sft" / "debug.yaml", "--from", base, "--set", f"out_dir={out}",
                  "--set", "train.eval_tasks=[bpb, skills]", "--set", "train.eval_limit=4")
    assert res.returncode == 0, res.stderr
    assert "base model: exact match" in res.stderr and "after SFT: exact match" in res.stderr
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 20 and 0 < final["bpb"] < 10 and 0 <= final["skills/exact_match"] <= 1
    report = json.loads((out / "sft_eval.json").read_text())
    assert report["before"]["n"] == 16 and 0 <= report["after"]["exact_match"] <= 1
    from llamac.infer.chat import JINJA_TEMPLATE
    from llamac.train import checkpoint
    state = checkpoint.read_state(checkpoint.latest(out))
    assert state["chat_template"] == JINJA_TEMPLATE
    from tests.test_train import snapshot
    before = snapshot(out)
    again = run_cli("sft", ROOT / "recipes" / "sft" / "debug.yaml", "--from", base, "--set", f"out_dir={out}")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr and "exact match" not in again.stderr      # no second scoring
    assert snapshot(out) == before                  # a finished run re-run writes nothing
    chat = run_cli("generate", "-c", out, "--chat", "--prompt", "What is 2 + 3?", "--max-new-tokens", "8",
                   "--temperature", "0")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.strip().splitlines()) <= 2


def test_sft_without_a_base_model_is_a_one_line_error(tmp_path):
    from tests.test_train import ROOT, run_cli
    res = run_cli("sft", ROOT / "recipes" / "sft" / "debug.yaml", "--from", tmp_path / "missing",
                  "--set", f"out_dir={tmp_path / 'o'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
