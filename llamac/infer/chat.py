"""The chat template, built on the tokenizer's reserved special tokens, and the chat REPL.

    <s><|system|>\nYou are helpful.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n

One rendering is used everywhere: `render` produces the text, the tokenizer encodes it with
its special pieces cut out and each run of text between them encoded on its own (the rule of
llama.cpp's SentencePiece tokenizer, and of transformers on the exported tokenizer, where the
chat tokens are special: so the ids equal those of `apply_chat_template` and of llama.cpp's
`create_chat_completion`, which render the Jinja template below), and `encode_chat`'s mask
marks the tokens that carry the loss: assistant contents and their <|end|>.
"""
from __future__ import annotations

import sys

END_OF_TURN = "<|end|>"
# The special tokens the template writes (the tokenizer's reserved pieces).
TEMPLATE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN)

# The same template as `render`, for tokenizer_config.json and GGUF.
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def header(role: str) -> str:
    return f"<|{role}|>\n"


def render(messages: list[dict], add_generation_prompt: bool = False, bos: str = "<s>"):
    """(text, spans): the rendered conversation and the character spans that carry loss."""
    parts, spans, pos = [bos], [], len(bos)
    for m in messages:
        head = header(m["role"])
        body = m["content"] + END_OF_TURN
        parts.append(head)
        pos += len(head)
        if m["role"] == "assistant":
            spans.append((pos, pos + len(body)))
        parts.append(body + "\n")
        pos += len(body) + 1
    if add_generation_prompt:
        parts.append(header("assistant"))
    return "".join(parts), spans


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    """(ids, loss_mask) for a conversation: the rendered text encoded once, special pieces cut out."""
    text, spans = render(messages, add_generation_prompt, bos="")
    ids, offsets = tokenizer.encode_with_offsets(text, bos=True, special=True)
    mask = [any(start >= a and end <= b for a, b in spans) and end > start for start, end in offsets]
    return ids, mask


def chat_command(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed):
    """`llamac generate --chat`: one turn with --prompt, else an interactive REPL (/reset, /exit)."""
    from llamac.infer.generate import generate_ids
    end_id = tokenizer.piece_to_id(END_OF_TURN)
    history: list[dict] = []

    def reply(user_text: str) -> str:
        history.append({"role": "user", "content": user_text})
        ids, _ = encode_chat(tokenizer, history, add_generation_prompt=True)
        room = model.config.max_seq_len - len(ids)
        while room < 1 and len(history) > 1:          # forget the oldest turns first
            del history[:2]
            ids, _ = encode_chat(tokenizer, history, add_generation_prompt=True)
            room = model.config.max_seq_len - len(ids)
        produced, shown = [], ""
        for token in generate_ids(model, ids, min(max_new_tokens, room), temperature, top_k, top_p, seed,
                                  tokenizer.eos_id, stop_ids=(end_id,)):
            produced.append(token)
            text = tokenizer.decode(produced)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        answer = tokenizer.decode(produced)
        sys.stdout.write(answer[len(shown):] + "\n")
        history.append({"role": "assistant", "content": answer})
        return answer

    if prompt is not None:
        reply(prompt)
        return
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if line.strip():
            reply(line)
