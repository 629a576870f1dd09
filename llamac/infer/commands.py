"""`llamac generate`: load a checkpoint, then stream continuations of prompts or chat with it."""
from __future__ import annotations

import sys

from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.infer.chat import chat_command
from llamac.infer.generate import OPTION_RANGES, _read_prompts, generate_batch, generate_text


def generate_command(checkpoint, prompt, prompt_file, max_new_tokens, temperature, top_k, top_p, seed, chat, device):
    """`llamac generate`: load a checkpoint and stream continuations (or chat)."""
    from llamac.train.checkpoint import load_model
    options = {"--max-new-tokens": max_new_tokens, "--temperature": temperature, "--top-k": top_k,
               "--top-p": top_p, "--seed": seed}
    for name, value in options.items():
        problem = OPTION_RANGES[name].violation(value) if value is not None else None
        if problem:
            raise LlamacError(f"{name} {problem}")
    if prompt is None and prompt_file is None and not chat:
        raise LlamacError("give --prompt TEXT, --prompt-file FILE or --chat")
    model, tokenizer, _ = load_model(checkpoint, device=backend.resolve_device(device))
    if tokenizer is None:
        raise LlamacError(f"checkpoint {checkpoint} has no tokenizer.model")
    if max_new_tokens >= model.config.max_seq_len:
        raise LlamacError(f"--max-new-tokens {max_new_tokens} exceeds the model's max_seq_len "
                          f"({model.config.max_seq_len}) minus the prompt")
    if chat:
        return chat_command(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed)
    prompts = [prompt] if prompt is not None else _read_prompts(prompt_file)
    if len(prompts) > 1 and generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        return
    for i, text in enumerate(prompts):
        if len(prompts) > 1:
            print(f"--- [{i + 1}/{len(prompts)}]", flush=True)
        generate_text(model, tokenizer, text, max_new_tokens, temperature, top_k, top_p, seed + i, stream=sys.stdout)
        print(flush=True)
