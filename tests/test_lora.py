"""LoRA: adapters trained by `llamac sft` on a frozen base, checked by the loaders that read them (PEFT on the
Hugging Face export of the base, transformers on the merged export, llama.cpp on the merged GGUF) and against
float64 finite differences; the base stays bit-identical; resume; one-line errors for bad input."""
import json
import shutil

import numpy as np
import pytest

import llamac
from llamac.cli import main
from llamac.config import DataConfig, LoRAConfig, ModelConfig, Recipe, SFTConfig, TrainConfig, load_recipe, validate
from llamac.engine.gradcheck import check_grad
from llamac.errors import LlamacError
from llamac.formats.export import export
from llamac.model.llama import Llama
from llamac.train import checkpoint, lora
from llamac.train.sft import finetune
from llamac.infer.chat import END_OF_TURN, encode_chat
from llamac.infer.generate import generate_ids
from tests.test_export import GQA, PROMPTS, TIED, _checkpoint, _cpp_greedy, _greedy, _llama_cpp, _logits, _margins, \
    _tokenizer, _tune, train_corpus
from tests.test_train import ROOT

LORA = LoRAConfig(rank=16, alpha=32.0)
NEW = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (
    ("What is 7 + 5?", "The queen."), ("Who walked?", "A young friend."),
    ("Where is the ship?", "Under the bright sea."), ("Hi!", "Good morning, king."))]   # not what the base knows


def _sft_recipe(out_dir, base, data, lora_cfg=LORA, **train) -> Recipe:
    settings = dict(batch_size=2, max_steps=150, lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0,
                    log_every=10, eval_every=0, ckpt_every=75, sample_tokens=0)
    recipe = Recipe(out_dir=str(out_dir), device="cpu", data=DataConfig(sources=[str(data)], val_fraction=0.0,
                                                                         seq_len=127),
                    train=TrainConfig(**{**settings, **train}),
                    sft=SFTConfig(from_checkpoint=str(base), eval_tasks=0, lora=lora_cfg))
    validate(recipe)
    return recipe


def _answers(model, tokenizer) -> list:
    end = tokenizer.piece_to_id(END_OF_TURN)
    out = []
    for chat in NEW:
        ids, _ = encode_chat(tokenizer, chat[:-1], add_generation_prompt=True)
        out.append(tokenizer.decode(list(generate_ids(model, ids, 12, temperature=0, eos_id=2, stop_ids=(end,)))))
    return out


def adapted(run) -> Llama:
    """base + adapters, unmerged: the base of a LoRA run with its adapters attached, as training has it."""
    ckpt = checkpoint.resolve_checkpoint(run)
    state = checkpoint.read_state(ckpt)["lora"]
    model, _, _ = checkpoint.load_model(state["base"])
    lora.apply_lora(model, lora.lora_config_of(state), lora.token_ids_of(state))
    checkpoint.load_trainable(model, checkpoint.load_safetensors(ckpt / "model.safetensors")[0], ckpt)
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """test_export's tokenizer (chat tokens at ids 3..10) and validation text."""
    return train_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus):
    """(base run, LoRA run, tokenizer): the untied GQA llama3-RoPE test model tuned on test_export's chats
    (the base), then `llamac sft` with rank-16 adapters on every projection, on NEW's answers."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = _tokenizer(corpus[0])
    base, _ = _checkpoint(root, GQA, corpus[0], tune=lambda m: _tune(m, tokenizer))
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in NEW))
    finetune(_sft_recipe(root / "lora", base, data))
    return base, root / "lora", tokenizer


@pytest.fixture(scope="module")
def tied_lora_run(tmp_path_factory, corpus):
    """(base run, LoRA run, tokenizer) as lora_run, on an untuned model whose head is its embedding,
    briefly: what the PEFT test needs is adapters and chat-token rows away from their start."""
    root = tmp_path_factory.mktemp("tied-lora")
    base, _ = _checkpoint(root, TIED, corpus[0])
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in NEW))
    finetune(_sft_recipe(root / "lora", base, data, max_steps=20, ckpt_every=0))
    return base, root / "lora", _tokenizer(corpus[0])


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(lora_run):
    base, run, _ = lora_run
    ckpt = checkpoint.latest(run)
    state = checkpoint.read_state(ckpt)
    weights, _ = checkpoint.load_safetensors(ckpt / "model.safetensors")
    assert sorted(weights) == sorted([f"layers.{i}.{part}.{name}.lora_{side}" for i in range(GQA.n_layers)
                                      for part, name in lora.TARGET_MODULES.values() for side in "ab"]
                                     + ["tok_embeddings.token_rows", "output.token_rows"])     # untied: both
    moments, _ = checkpoint.load_safetensors(ckpt / "optimizer.safetensors")
    assert sorted(moments) == sorted(f"{k}.{n}" for k in "mv" for n in weights)     # state for the adapters only
    assert state["lora"]["base"] == str(checkpoint.resolve_checkpoint(base).resolve())
    assert state["lora"]["base_hash"] == lora.weights_hash(checkpoint.base_weights(base))
    assert all(np.abs(w).max() > 0 for n, w in weights.items() if n.endswith("lora_b"))   # trained away from 0
    ids = state["lora"]["token_ids"]
    assert ids == [3, 4, 5, 6]                       # <|system|>, <|user|>, <|assistant|>, <|end|>
    base_weights = checkpoint.base_weights(base)
    for name in ("tok_embeddings", "output"):        # the rows trained away from the base's rows
        assert np.abs(weights[f"{name}.token_rows"] - base_weights[f"{name}.weight"][ids]).max() > 1e-3


def test_lora_learns_answers_the_base_does_not_give(lora_run):
    """Requirement 3 in small (BENCHMARKS.md has the tiny model on builtin:instruct): the adapters alone
    teach the frozen base NEW's answers, word for word."""
    base, run, tokenizer = lora_run
    before, after = _answers(checkpoint.load_model(base)[0], tokenizer), _answers(adapted(run), tokenizer)
    print(f"base: {before}; LoRA: {after}")
    assert not any(a == c[-1]["content"] for a, c in zip(before, NEW))
    assert after == [c[-1]["content"] for c in NEW]


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_peft_gives_llamacs_logits_and_the_merged_exports(tmp_path, request, which):
    """The adapters and the chat tokens' rows (PEFT's trainable tokens: the embedding's and the head's
    untied, one set for both tied) in PEFT, against llamac's base + adapters and the merged export."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, run, tokenizer = request.getfixturevalue("lora_run" if which == "untied" else "tied_lora_run")
    cfg = GQA if which == "untied" else TIED
    base_hf = export(base, format="hf", out=tmp_path / "base-hf")
    adapter = export(run, format="peft", out=tmp_path / "adapter")
    merged_hf = export(run, format="hf", out=tmp_path / "merged-hf")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 16, 32.0,
                                                                                             "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(lora.TARGET_MODULES)
    ids = [3, 4, 5, 6]
    assert config["trainable_token_indices"] == (ids if which == "tied" else {"embed_tokens": ids, "lm_head": ids})
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32), adapter).eval()
    assert sum(1 for n, _ in ref.named_parameters() if "lora_" in n) == 2 * 7 * cfg.n_layers   # every adapter loaded
    deltas = [p.detach().numpy() for n, p in ref.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if which == "tied" else 2)
    embed = checkpoint.base_weights(base)["tok_embeddings.weight"][ids]
    assert min(np.abs(d - embed).max() for d in deltas[:1]) > 1e-3    # trained rows: they count in the logits
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_hf, dtype=torch.float32).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32).eval()
    ours = adapted(run)
    worst_peft = worst_merged = 0.0
    chats = [encode_chat(tokenizer, c[:-1], add_generation_prompt=True)[0] for c in NEW]   # the rows as inputs
    for ids in [tokenizer.encode(prompt, bos=True) for prompt in PROMPTS] + chats:
        want = _logits(ours, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].numpy()
            merged_logits = merged(torch.tensor([ids])).logits[0].numpy()
            base_logits = plain(torch.tensor([ids])).logits[0].numpy()
        scale = np.abs(want).max()
        worst_peft = max(worst_peft, float(np.abs(theirs - want).max() / scale))
        worst_merged = max(worst_merged, float(np.abs(merged_logits - theirs).max() / scale))
        assert np.abs(base_logits - want).max() / scale > 1e-2       # the adapters change the model
    print(f"max relative logit difference PEFT vs llamac {worst_peft:.2e}, merged HF vs PEFT {worst_merged:.2e}")
    assert worst_peft <= 1e-4 and worst_merged <= 1e-4
    if which == "tied":
        return                                                         # briefly trained: no answers to check
    hf_tok = transformers.AutoTokenizer.from_pretrained(adapter)       # the run's tokenizer, with the template
    for chat, answer in zip(NEW, _answers(ours, tokenizer)):
        prompt = hf_tok.apply_chat_template(chat[:-1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            got = ref.generate(**prompt, do_sample=False, max_new_tokens=12)[0, prompt["input_ids"].shape[1]:]
        assert hf_tok.decode(got, skip_special_tokens=True) == answer == chat[-1]["content"]


def test_the_merged_gguf_gives_llamacs_greedy_tokens(tmp_path, lora_run):
    _, run, tokenizer = lora_run
    ours = adapted(run)
    llm = _llama_cpp(export(run, format="gguf", out=tmp_path / "merged.gguf"))
    for prompt in PROMPTS[:4]:
        ids = tokenizer.encode(prompt, bos=True)
        expected = _greedy(ours, ids)
        assert _margins(ours, ids, expected).min() > 1e-5, "near-tie in the test model"
        assert _cpp_greedy(llm, ids) == expected, prompt


def test_generate_on_a_lora_run_is_base_plus_adapters(lora_run, capsys):
    base, run, tokenizer = lora_run
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    main(["generate", "-c", str(run), "-p", "The king", "-n", "8", "-t", "0", "--device", "cpu"])
    expected = tokenizer.decode(_greedy(adapted(run), tokenizer.encode("The king", bos=True), 8))
    assert capsys.readouterr().out == "The king" + expected + "\n"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before      # nothing merged onto disk
    plain = tokenizer.decode(_greedy(checkpoint.load_model(base)[0], tokenizer.encode("The king", bos=True), 8))
    assert plain != expected


def test_lora_on_a_hugging_face_folder(tmp_path, lora_run):
    base, _, tokenizer = lora_run
    base_hf = export(base, format="hf", out=tmp_path / "base-hf")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in NEW))
    finetune(_sft_recipe(tmp_path / "run", base_hf, data, max_steps=10, ckpt_every=0))
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "run"))["lora"]
    assert state["base"] == str(base_hf.resolve()) and state["base_hash"] == lora.weights_hash(
        checkpoint.base_weights(base))                    # the folder's weights are the checkpoint's
    ids = tokenizer.encode(PROMPTS[0], bos=True)
    merged, _, _ = checkpoint.load_model(tmp_path / "run")
    want = _logits(adapted(tmp_path / "run"), ids)
    assert np.abs(_logits(merged, ids) - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_gradients_match_float64_finite_differences(tied):
    """The adapters' and the token rows' gradients (rows read as inputs and as logits, the head's own
    rows untied, the embedding's tied), rsLoRA's scale."""
    llamac.manual_seed(3)
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40, max_seq_len=8,
                      tie_embeddings=tied)
    model = lora.apply_lora(Llama(cfg).to(dtype="float64"), LoRAConfig(rank=2, alpha=3.0, rslora=True), [3, 5, 6])
    assert model.layers[0].attention.wq.scale == 3.0 / np.sqrt(2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 12, (2, 6)), rng.integers(0, 12, (2, 6))
    x[0, :3], y[1, :3] = [3, 5, 6], [6, 3, 5]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in names if "token" in n] == ["tok_embeddings.token_rows"] + ([] if tied else ["output.token_rows"])
    owners = {n: dict(model.named_modules())[n.rsplit(".", 1)[0]] for n in names}
    start = [rng.standard_normal(p.shape) * 0.3 for n, p in model.named_parameters() if p.requires_grad]

    def loss(*adapters):
        for name, t in zip(names, adapters):
            setattr(owners[name], name.rsplit(".", 1)[1], t)
        return model(x, y)[1]
    assert check_grad(loss, *start, rtol=1e-6, atol=1e-9)


def test_chat_tokens_off_and_checkpoints_from_before_the_setting():
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40, max_seq_len=8)
    model = lora.apply_lora(Llama(cfg), LoRAConfig(rank=2, chat_tokens=False), token_ids=[3, 4])
    assert type(model) is not lora.LoRALlama and not any("token" in n for n, _ in model.named_parameters())
    old = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj"], "base": "b", "base_hash": "h"}
    assert lora.lora_config_of(old) == LoRAConfig(rank=4, alpha=8.0, targets=["q_proj"], chat_tokens=False)
    assert lora.token_ids_of(old) == [] and lora.scale_of(old) == 2.0
    assert lora.describe(LoRAConfig(chat_tokens=False), "b", "h", [3, 4])["token_ids"] == []


def test_training_leaves_the_base_bit_identical_and_resumes(tmp_path):
    from llamac.train.loop import Trainer
    llamac.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 64, (4, 16)), rng.integers(0, 64, (4, 16)), None)
    batch[0][0, :2] = 3, 9                              # the token rows' ids among the inputs
    base = Llama(cfg)

    def run(out, steps=10):
        llamac.manual_seed(1)                           # the same adapters' start in each run
        model = lora.apply_lora(Llama(cfg), LoRAConfig(rank=4, alpha=8.0), token_ids=[3, 9])
        model.load_state_dict({**base.state_dict(), **{n: p.data for n, p in model.named_parameters()
                                                       if p.requires_grad}})
        frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
        recipe = Recipe(out_dir=str(out), train=TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=0, ckpt_every=5,
                                                            eval_every=0, log_every=5, keep_checkpoints=0))
        Trainer(recipe, model, "cpu", lambda step, micro: batch, lambda m: {"val_loss": 0.0}).run()
        assert all(np.array_equal(p.data, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        rows = model.tok_embeddings.token_rows.data             # the chat tokens' rows trained, the rest did not
        assert np.abs(rows - base.tok_embeddings.weight.data[[3, 9]]).max() > 1e-3
        return checkpoint.load_safetensors(checkpoint.latest(out) / "model.safetensors")[0]

    straight = run(tmp_path / "a")
    run(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000010")
    resumed = run(tmp_path / "b")                       # from step 5
    assert sorted(resumed) == sorted(straight)
    assert all(np.array_equal(resumed[n], straight[n]) for n in straight)


# ------------------------------------------------------------------ bad input: one line each

def _one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


LORA_DEBUG = ROOT / "recipes" / "sft" / "lora-debug.yaml"


@pytest.mark.parametrize("setting,needle", [
    ("sft.lora.rank=0", "'sft.lora.rank' must be >= 1, got 0"),
    ("sft.lora.targets=[q_proj,lm_head]", "unknown target 'lm_head'"),
    ("sft.lora.targets=[]", "has no target"),
    ("sft.lora.alpha=0", "'sft.lora.alpha' must be > 0"),
    ("sft.lora.dropout=1.0", "'sft.lora.dropout' must be in [0, 1)"),
])
def test_bad_lora_settings_are_one_line_errors(tmp_path, capsys, setting, needle):
    assert needle in _one_line_error(capsys, "sft", LORA_DEBUG, "--set", setting, "--set", f"out_dir={tmp_path}")


def test_a_rank_above_a_projections_dimension_is_a_one_line_error(tmp_path, lora_run, capsys):
    base = lora_run[0]     # dim 64; k and v project to 2 heads x 16 = 32
    err = _one_line_error(capsys, "sft", LORA_DEBUG, "--from", base, "--set", "sft.lora.rank=33",
                          "--set", f"out_dir={tmp_path}")
    assert "'sft.lora.rank' 33 is above the dimension of k_proj (32 x 64): choose at most 32" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_lora_run_without_its_base_is_a_one_line_error(tmp_path, lora_run, capsys, corpus):
    _, run, _ = lora_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    ckpt = checkpoint.latest(moved)
    state = json.loads((ckpt / "state.json").read_text())
    state["lora"]["base"] = str(tmp_path / "gone")
    (ckpt / "state.json").write_text(json.dumps(state))
    err = _one_line_error(capsys, "generate", "-c", moved, "-p", "The", "-n", "2")
    assert f"its base model {tmp_path / 'gone'} is missing" in err
    other, _ = _checkpoint(tmp_path, GQA, corpus[0], seed=5)     # same shapes, other weights
    state["lora"]["base"] = str(checkpoint.resolve_checkpoint(other))
    (ckpt / "state.json").write_text(json.dumps(state))
    for argv in (("generate", "-c", moved, "-p", "The", "-n", "2"),
                 ("export", moved, "--format", "hf", "--out", tmp_path / "hf")):
        assert "is not the model it was trained on (weights hash sha256:" in _one_line_error(capsys, *argv)
    assert not (tmp_path / "hf").exists()


def test_a_peft_export_of_a_full_model_is_a_one_line_error(tmp_path, lora_run, capsys):
    err = _one_line_error(capsys, "export", lora_run[0], "--format", "peft", "--out", tmp_path / "adapter")
    assert "has no LoRA adapters (a full model)" in err and not (tmp_path / "adapter").exists()


def test_a_lora_recipe_does_not_resume_another_kind_of_run(tmp_path, lora_run):
    base, run, _ = lora_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in NEW))
    with pytest.raises(LlamacError, match="has LoRA rank 16; the recipe asks for rank 2"):
        finetune(_sft_recipe(out, base, data, LoRAConfig(rank=2, alpha=32.0), max_steps=160))
    with pytest.raises(LlamacError, match="has LoRA chat_tokens True; the recipe asks for chat_tokens False"):
        finetune(_sft_recipe(out, base, data, LoRAConfig(rank=16, alpha=32.0, chat_tokens=False), max_steps=160))
    with pytest.raises(LlamacError, match="is a LoRA run; the recipe asks for full fine-tuning"):
        finetune(_sft_recipe(out, base, data, None, max_steps=160))


def test_the_lora_recipes_load():
    recipe = load_recipe(ROOT / "recipes" / "sft" / "lora-tiny.yaml")
    assert recipe.sft.lora == LoRAConfig(rank=16, alpha=32.0, dropout=0.0, targets=list(lora.TARGET_MODULES))
    assert load_recipe(ROOT / "recipes" / "sft" / "debug.yaml", ["sft.lora.rank=4"]).sft.lora.rank == 4
    assert load_recipe(ROOT / "recipes" / "sft" / "debug.yaml").sft.lora is None


def test_adapters_start_from_the_run_seed_alone():
    """A's initial draw depends on apply_lora's seed and nothing else (not the global generators), so
    two runs of one recipe start, and train, identically."""
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40, max_seq_len=8)

    def adapters(seed, global_seed):
        llamac.manual_seed(global_seed)
        model = lora.apply_lora(Llama(cfg), LoRAConfig(rank=2), token_ids=[3], seed=seed)
        return {n: p.data.copy() for n, p in model.named_parameters() if "lora_a" in n}

    first = adapters(7, 0)
    assert first and all(np.array_equal(a, b) for a, b in zip(first.values(), adapters(7, 1).values()))
    assert not any(np.array_equal(a, b) for a, b in zip(first.values(), adapters(8, 0).values()))
