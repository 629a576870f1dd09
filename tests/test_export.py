"""Exports checked by the loaders that read them: transformers (Hugging Face folder), llama.cpp through
llama-cpp-python (GGUF) and llamac itself (round trips). The models are tiny, random and seeded, so greedy
continuations are degenerate loops; the checks only need them deterministic and free of near-ties, which
`_margins` asserts first so a failure can't be blamed on a coin flip between two equal logits.
"""
import json
import random

import numpy as np
import pytest

import llamac
from llamac.cli import main
from llamac.config import ModelConfig, Recipe
from llamac.errors import LlamacError
from llamac.formats.export import export, read_source
from llamac.infer.chat import END_OF_TURN, JINJA_TEMPLATE, encode_chat
from llamac.infer.generate import generate_ids
from llamac.model.llama import Llama
from llamac.train import checkpoint

CHAT = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>",
        "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>")
CHAT_TEMPLATE = JINJA_TEMPLATE     # llamac's chat template, as SFT stores it
GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=416, max_seq_len=128,
                  tie_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32})
TIED = ModelConfig(dim=48, n_layers=2, n_heads=3, hidden_dim=80, vocab_size=400, max_seq_len=96, tie_embeddings=True)
PROMPTS = ["The king walked", "Under the bright sea", "A letter from 1887", "  Night and morning",
           "She answered quietly,", "Old friends: café", "Because the wind", "x"]
WORDS = ("the a king queen river stone light house garden night morning friend letter ship sea wind walked spoke "
         "found wrote carried opened remembered answered quietly slowly never always again beautiful old young "
         "small great dark bright with from under over into because while and but").split()


def _text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        s = s[0].upper() + s[1:]
        if rng.random() < 0.2:
            s += f" in {rng.randint(1, 2024)}"
        if rng.random() < 0.1:
            s += " — café, naïve, 東京 🙂"
        out.append(("  " if rng.random() < 0.1 else "") + s + rng.choice(".!?;,:"))
        if rng.random() < 0.2:
            out.append("\n" + ("\t" if rng.random() < 0.3 else ""))
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer trained like llamac's (BPE, byte fallback, split digits, identity normalization,
    whitespace kept, chat tokens at ids 3..10) and a held-out validation text."""
    return train_corpus(tmp_path_factory.mktemp("corpus"))


def train_corpus(root):
    """(the tokenizer `corpus` trains into root, its validation text)."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_text(0, 3000).split("\n")), model_prefix=str(root / "tok"), model_type="bpe",
        vocab_size=400, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, user_defined_symbols=list(CHAT),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return root / "tok.model", _text(1, 80)


def _checkpoint(tmp_path, cfg, tokenizer, seed=0, tune=None):
    llamac.manual_seed(seed)
    model = Llama(cfg).eval()
    if tune is not None:
        tune(model)
    run = tmp_path / f"run-{seed}"
    checkpoint.save(run, 7, model, None, Recipe(model=cfg), {"chat_template": CHAT_TEMPLATE},
                    tokenizer_path=tokenizer, keep=1)
    return run, model


def _logits(model, ids) -> np.ndarray:
    with llamac.no_grad():
        return model(np.array([ids]))[0].numpy()[0]


def _greedy(model, ids, n=32, eos=2) -> list:
    return list(generate_ids(model, ids, n, temperature=0, eos_id=eos))


def _margins(model, ids, continuation) -> np.ndarray:
    """(top-1 - top-2) / max |logit| at each greedy step: the room a reimplementation has for rounding."""
    logits = _logits(model, ids + continuation[:-1] if continuation else ids)[len(ids) - 1:]
    top = np.sort(logits, axis=-1)
    return (top[:, -1] - top[:, -2]) / np.abs(logits).max(axis=-1)


def _tokenizer(path):
    from llamac.data.tokenizer import Tokenizer
    return Tokenizer(path)


# ------------------------------------------------------------------ Hugging Face

@pytest.mark.parametrize("cfg", [GQA, TIED], ids=["gqa-llama3-untied", "tied"])
def test_hf_export_runs_in_transformers(tmp_path, corpus, cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok_path, validation = corpus
    run, model = _checkpoint(tmp_path, cfg, tok_path)
    out = export(run, format="hf", out=tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == cfg.tie_embeddings
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"]["content"] == "<s>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 6]   # </s>, <|end|>
    assert config["eos_token_id"] == [2, 6]

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = _tokenizer(tok_path)
    chat = "<|user|>\nHi there!<|end|>\n<|assistant|>\nHello.<|end|>\n"
    for text in (validation, " leading space", "\n\ttabs  and  spaces "):
        assert hf_tok(text)["input_ids"] == ours_tok.encode(text, bos=True), text[:40]
    assert hf_tok(chat)["input_ids"] == ours_tok.encode(chat, bos=True, special=True)    # chat tokens are special
    assert hf_tok.decode(hf_tok(validation)["input_ids"], skip_special_tokens=True) == validation
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there!"},
                {"role": "assistant", "content": "Hello."}]
    templated = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert templated == encode_chat(ours_tok, messages)[0]             # the ids SFT trains on
    prompt_only = messages[:2]
    templated = hf_tok.apply_chat_template(prompt_only, tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
    assert templated == encode_chat(ours_tok, prompt_only, add_generation_prompt=True)[0]   # what chat sends

    worst = 0.0
    for prompt in PROMPTS:
        ids = ours_tok.encode(prompt, bos=True)
        ours = _logits(model, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
        expected = _greedy(model, ids)
        assert _margins(model, ids, expected).min() > 1e-5, "near-tie in the test model"
        with torch.no_grad():
            got = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        if got and got[-1] == 2:       # transformers emits the eos it stops at; generate_ids doesn't
            got = got[:-1]
        assert got == expected, prompt
    print(f"max relative logit difference transformers vs llamac ({cfg.n_heads}/{cfg.n_kv_heads}): {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("cfg", [GQA, TIED], ids=["gqa-llama3-untied", "tied"])
def test_hf_round_trip_is_bit_identical(tmp_path, corpus, cfg):
    tok_path, _ = corpus
    run, model = _checkpoint(tmp_path, cfg, tok_path)
    hf_dir = export(run, format="hf", out=tmp_path / "hf")
    native = export(hf_dir, format="llamac", out=tmp_path / "native")   # HF folder -> llamac checkpoint
    again = export(hf_dir, format="hf", out=tmp_path / "hf2")           # HF folder -> HF folder
    ids = _tokenizer(tok_path).encode(PROMPTS[0], bos=True)
    expected = _logits(model, ids)
    for path in (hf_dir, native, again):
        loaded, tokenizer, _ = checkpoint.load_model(path)
        assert loaded.config.tie_embeddings == cfg.tie_embeddings
        assert np.array_equal(_logits(loaded, ids), expected), path
        assert tokenizer.encode(PROMPTS[0], bos=True) == ids
    assert checkpoint.read_state(checkpoint.resolve_checkpoint(native))["chat_template"] == CHAT_TEMPLATE
    assert (native / "state.json").is_file() and not (native / "optimizer.safetensors").exists()


def test_hf_bf16_export_and_import(tmp_path, corpus):
    tok_path, _ = corpus
    run, model = _checkpoint(tmp_path, TIED, tok_path)
    out = export(run, format="hf", out=tmp_path / "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _, _ = checkpoint.load_model(out)
    for name, w in model.state_dict().items():
        got = dict(loaded.named_parameters())[name].data
        assert np.allclose(got, w, rtol=1 / 128, atol=1e-6), name
    again = export(run, format="hf", out=tmp_path / "hf-torch-name", dtype="bfloat16")   # torch's spelling
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_export_help_names_the_dtypes_as_the_readme_does(capsys):
    main(["export", "--help"])
    assert "hf: f32, bf16 or f16; gguf: f32, f16 or q8_0" in " ".join(capsys.readouterr().out.replace("│", " ").split())


def test_generate_cli_takes_a_hf_folder(tmp_path, corpus, capsys):
    tok_path, _ = corpus
    run, model = _checkpoint(tmp_path, TIED, tok_path)
    hf_dir = export(run, format="hf", out=tmp_path / "hf")
    main(["generate", "-c", str(hf_dir), "-p", "The king", "-n", "8", "-t", "0", "--device", "cpu"])
    tokenizer = _tokenizer(tok_path)
    expected = tokenizer.decode(_greedy(model, tokenizer.encode("The king", bos=True), 8))
    assert capsys.readouterr().out == "The king" + expected + "\n"


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory, corpus):
    """A folder as transformers itself writes it: bf16, sharded with an index, v5's rope_parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama"
    ref.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "tokenizer.model").write_bytes(corpus[0].read_bytes())
    ids = _tokenizer(corpus[0]).encode(PROMPTS[0], bos=True)
    with torch.no_grad():
        return folder, ids, ref.float()(torch.tensor([ids])).logits[0].numpy()


def test_import_of_a_folder_saved_by_transformers(saved_by_transformers):
    folder, ids, expected = saved_by_transformers
    model, tokenizer, path = checkpoint.load_model(folder)
    assert path == folder and model.config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert tokenizer.encode(PROMPTS[0], bos=True) == ids
    assert np.abs(_logits(model, ids) - expected).max() / np.abs(expected).max() < 1e-4


# ------------------------------------------------------------------ GGUF / llama.cpp

def _llama_cpp(path, f32_cache=True):
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama as module
    defaults = module.llama_cpp.llama_model_default_params

    def params():
        # llama.cpp's extra CPU buffer types (weight repacking, AMX) crash on some CPUs for Q8_0,
        # for its own quantizations too; the plain CPU path reads the same file.
        p = defaults()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p
    module.llama_cpp.llama_model_default_params = params
    try:
        # An F32 KV cache: llama.cpp's default F16 cache rounds keys and values (~1e-4 of the logits),
        # which would measure the cache, not the exported weights.
        cache = {"type_k": 0, "type_v": 0} if f32_cache else {}
        # One thread: the model is tiny, and idle OpenMP workers spin when the CPU is shared.
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_threads_batch=1, logits_all=True,
                               verbose=False, seed=0, **cache)
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def _cpp_greedy(llm, ids, n=32, eos=2) -> list:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def test_gguf_runs_in_llama_cpp(tmp_path, corpus):
    tok_path, validation = corpus
    run, model = _checkpoint(tmp_path, GQA, tok_path)
    tokenizer = _tokenizer(tok_path)
    f32 = export(run, format="gguf", out=tmp_path / "model-f32.gguf")
    llm = _llama_cpp(f32)
    assert llm.tokenize(validation.encode(), add_bos=True, special=False) == tokenizer.encode(validation, bos=True)
    worst = 0.0
    for prompt in PROMPTS[:4]:
        ids = tokenizer.encode(prompt, bos=True)
        expected = _greedy(model, ids)
        assert _margins(model, ids, expected).min() > 1e-5, "near-tie in the test model"
        assert _cpp_greedy(llm, ids) == expected, prompt
        llm.reset()
        llm.eval(ids)
        ours = _logits(model, ids)
        worst = max(worst, float(np.abs(np.array(llm.scores[:len(ids)]) - ours).max() / np.abs(ours).max()))
    print(f"max relative logit difference llama.cpp F32 vs llamac: {worst:.2e}")
    assert worst < 1e-4
    del llm

    for dtype, tol in (("f16", 5e-3), ("q8_0", 3e-2)):
        path = export(run, format="gguf", out=tmp_path / f"model-{dtype}.gguf", dtype=dtype)
        llm = _llama_cpp(path, f32_cache=False)
        for prompt in PROMPTS[:4]:
            ids = tokenizer.encode(prompt, bos=True)
            llm.reset()
            llm.eval(ids)
            theirs, ours = np.array(llm.scores[len(ids) - 1]), _logits(model, ids)[-1]
            assert np.abs(theirs - ours).max() / np.abs(ours).max() < tol, (dtype, prompt)
            if dtype == "f16":
                assert int(theirs.argmax()) == int(ours.argmax()), prompt
        del llm


def test_gguf_from_a_transformers_folder_with_linear_rope(tmp_path, saved_by_transformers):
    folder, ids, expected = saved_by_transformers
    llm = _llama_cpp(export(folder, format="gguf", out=tmp_path / "tiny.gguf"))
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_gguf_metadata(tmp_path, corpus):
    gguf = pytest.importorskip("gguf")
    tok_path, _ = corpus
    run, _ = _checkpoint(tmp_path, TIED, tok_path)
    reader = gguf.GGUFReader(export(run, format="gguf", out=tmp_path / "m.gguf", dtype="f16"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    vocab = _tokenizer(tok_path)              # llamac's reading of the model, not the exporter's
    assert fields["general.architecture"] == "llama" and fields["GGUF.version"] == 3
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 3
    assert fields["llama.context_length"] == 96 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.tokens"] == vocab.pieces
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.CONTROL for i in range(3, 11))       # the chat tokens
    assert types[11] == gguf.TokenType.BYTE and np.allclose(fields["tokenizer.ggml.scores"], vocab.scores)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.eot_token_id"] == vocab.piece_to_id("<|end|>") == 6
    assert fields["tokenizer.ggml.unknown_token_id"] == 0 and fields["tokenizer.ggml.padding_token_id"] == 7
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in tensors                         # tied: llama.cpp reuses token_embd
    assert tensors["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


# ------------------------------------------------------------------ chat: one turn, three runtimes

TRAINED = [   # what the chat model is tuned on; the prompts below are these without their last answer
    [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who walked?"},
     {"role": "assistant", "content": "The king walked."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, friend."},
     {"role": "user", "content": "And the queen?"}, {"role": "assistant", "content": "She spoke quietly."}],
]
CHATS = [(c[:-1], 24) for c in TRAINED] + [
    (TRAINED[2][:-1], 3),                                            # cut by the token limit mid-answer
    ([{"role": "user", "content": "Under the bright sea"}], 24),     # never seen
]


def _tune(model, tokenizer, steps=80):
    """SFT as `llamac sft` does it (packed rows, loss on the assistant tokens and their <|end|>), full batch."""
    from llamac.train.optim import AdamW
    from llamac.train.sft import batch_arrays, pack
    packed = pack([encode_chat(tokenizer, c) for c in TRAINED], model.config.max_seq_len - 1, tokenizer.eos_id)
    x, y, segments = batch_arrays(packed, np.arange(len(packed.tokens)))
    opt = AdamW(model.named_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        _, loss = model(x, y, segment_ids=segments)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, corpus):
    """(run, tokenizer, turns): a tiny model tuned until it answers TRAINED and ends its turn, and llamac's
    greedy chat turn for each of CHATS: (prompt ids, answer ids, the id it stopped at or None at the limit)."""
    tokenizer = _tokenizer(corpus[0])
    run, model = _checkpoint(tmp_path_factory.mktemp("chat"), GQA, corpus[0], tune=lambda m: _tune(m, tokenizer))
    end = tokenizer.piece_to_id(END_OF_TURN)
    turns = []
    for messages, n in CHATS:
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
        # as `llamac generate --chat` generates; the id it stopped at is the next greedy one
        answer = list(generate_ids(model, ids, n, temperature=0, eos_id=tokenizer.eos_id, stop_ids=(end,)))
        stop = int(_logits(model, ids + answer)[-1].argmax()) if len(answer) < n else None
        assert _margins(model, ids, answer + [stop] if stop is not None else answer).min() > 1e-5, "near-tie"
        turns.append((ids, answer, stop))
    return run, tokenizer, turns


def test_the_chat_model_ends_its_turns(chat_model):
    _, tokenizer, turns = chat_model
    stops = [stop for _, _, stop in turns]
    assert stops[:3] == [tokenizer.piece_to_id(END_OF_TURN)] * 3 and stops[3] is None    # both ends get exercised
    assert [tokenizer.decode(answer) for _, answer, _ in turns[:3]] == [c[-1]["content"] for c in TRAINED]


def test_chat_turns_in_transformers_are_llamacs(tmp_path, chat_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run, _, turns = chat_model
    out = export(run, format="hf", out=tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for (messages, n), (ids, answer, stop) in zip(CHATS, turns):
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        assert prompt["input_ids"][0].tolist() == ids, messages
        with torch.no_grad():    # greedy, stopping where the export's generation_config says
            got = ref.generate(**prompt, do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        assert got == answer + ([stop] if stop is not None else []), messages   # it emits the id it stops at


def _cpp_chat(llm, messages, max_tokens):
    """llama.cpp's chat completion at temperature 0: (the prompt ids it evaluated, the ids it sampled, response)."""
    seen, generate = {}, llm.generate

    def recording(tokens, *args, **kwargs):
        seen["prompt"], seen["sampled"] = list(tokens), []
        for token in generate(tokens, *args, **kwargs):
            seen["sampled"].append(int(token))
            yield token
    llm.generate = recording
    try:
        response = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=max_tokens)
    finally:
        del llm.generate
    return seen["prompt"], seen["sampled"], response


def test_chat_completions_in_llama_cpp_are_llamacs(tmp_path, chat_model):
    run, tokenizer, turns = chat_model
    llm = _llama_cpp(export(run, format="gguf", out=tmp_path / "chat.gguf"))
    for (messages, n), (ids, answer, stop) in zip(CHATS, turns):
        prompt, sampled, response = _cpp_chat(llm, messages, n)
        assert prompt == ids, messages
        assert sampled == answer + ([stop] if stop is not None else []), messages   # the stop id ends it
        choice = response["choices"][0]
        assert choice["finish_reason"] == ("length" if stop is None else "stop")
        assert choice["message"]["content"] == tokenizer.decode(answer)


def test_llama_cpp_tokenizes_rendered_chats_as_llamac(tmp_path, chat_model):
    Jinja2ChatFormatter = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    run, tokenizer, _ = chat_model
    llm = _llama_cpp(export(run, format="gguf", out=tmp_path / "chat.gguf"))
    # what create_chat_completion does: render the GGUF's template, tokenize with special tokens
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    tricky = [[{"role": "system", "content": "  Two  spaces,\ttabs\nand lines. "},
               {"role": "user", "content": "café, naïve, 東京 🙂 in 1887"}],
              [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}, {"role": "user", "content": "\n"}]]
    for messages in [m for m, _ in CHATS] + TRAINED + tricky:
        text = formatter(messages=messages).prompt
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, messages


# ------------------------------------------------------------------ errors and atomicity

def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *map(str, argv)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_export_errors_are_one_line(tmp_path, corpus, capsys):
    tok_path, _ = corpus
    run, _ = _checkpoint(tmp_path, TIED, tok_path)
    (tmp_path / "not_a_checkpoint").mkdir()
    assert "not a llamac checkpoint" in _cli_error(capsys, tmp_path / "not_a_checkpoint", "--format", "hf",
                                                   "--out", tmp_path / "x")
    assert "not found" in _cli_error(capsys, tmp_path / "missing", "--format", "hf", "--out", tmp_path / "x")
    assert "unsupported export format" in _cli_error(capsys, run, "--format", "onnx", "--out", tmp_path / "x")
    assert "--dtype" in _cli_error(capsys, run, "--format", "gguf", "--dtype", "q4_0", "--out", tmp_path / "x")
    (tmp_path / "taken.gguf").write_text("keep me")
    assert "--force" in _cli_error(capsys, run, "--format", "gguf", "--out", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "taken.gguf"), "--force"])
    assert (tmp_path / "taken.gguf").read_bytes()[:4] == b"GGUF"
    assert capsys.readouterr().err.startswith("exported ")
    assert "directory" in _cli_error(capsys, run, "--format", "gguf", "--out", tmp_path / "not_a_checkpoint", "--force")
    assert "holds the checkpoint" in _cli_error(capsys, run, "--format", "llamac", "--out", run, "--force")
    bad = tmp_path / "mistral"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    assert "Llama" in _cli_error(capsys, bad, "--format", "gguf", "--out", tmp_path / "y.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral", "not_a_checkpoint", "run-0", "taken.gguf"]


def _interrupt_after(monkeypatch, owner, name):
    """Make owner.name do its work, then raise KeyboardInterrupt (Ctrl-C with a partial output on disk)."""
    real = getattr(owner, name)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("format,name", [("hf", "hf"), ("gguf", "m.gguf"), ("llamac", "native")])
def test_interrupted_export_leaves_nothing_under_the_target(tmp_path, corpus, monkeypatch, format, name):
    import gguf

    import llamac.formats.export as export_module
    tok_path, _ = corpus
    run, _ = _checkpoint(tmp_path, TIED, tok_path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / name
    owner, attr = {"hf": (export_module, "write_safetensors"), "gguf": (gguf.GGUFWriter, "write_tensors_to_file"),
                   "llamac": (checkpoint, "_save_safetensors")}[format]
    with monkeypatch.context() as patch:
        _interrupt_after(patch, owner, attr)
        with pytest.raises(KeyboardInterrupt):
            export(run, format=format, out=target)
    assert list(out.iterdir()) == []           # neither the target nor a temporary remains

    export(run, format=format, out=target)     # --force over an existing output: the old one survives
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with monkeypatch.context() as patch:
        _interrupt_after(patch, owner, attr)
        with pytest.raises(KeyboardInterrupt):
            export(run, format=format, out=target, force=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_untied_folder_without_head_is_an_error(tmp_path, corpus):
    from llamac.formats.export import write_safetensors
    from llamac.formats.hf_import import read_safetensors
    hf_dir = export(_checkpoint(tmp_path, GQA, corpus[0])[0], format="hf", out=tmp_path / "hf")
    tensors = {k: np.array(v) for k, v in read_safetensors(hf_dir / "model.safetensors")[0].items()
               if k != "lm_head.weight"}
    write_safetensors(hf_dir / "model.safetensors", tensors, np.float32, {"format": "pt"})
    with pytest.raises(LlamacError, match="tie_word_embeddings is false but there is no lm_head"):
        read_source(hf_dir)


def test_help_shows_no_value_after_a_flag(capsys):
    try:
        main(["export", "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    lines = [line for line in capsys.readouterr().out.splitlines() if "--force" in line or "--help " in line]
    assert len(lines) == 2
    for line in lines:      # no type or value placeholder after a flag, in any typer's style
        assert not any(word in line for word in ("<bool>", "BOOLEAN", "<", "TEXT")), line
