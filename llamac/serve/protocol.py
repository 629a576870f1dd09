"""The OpenAI API's request checks and response shapes, with no web framework: bodies in, dicts out.

Every problem with a request is an ApiError: its HTTP status and the API's error object,
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from llamac.config import SEED_MAX
from llamac.infer.chat import END_OF_TURN, render
from llamac.serve.scheduler import Sampling

ROLES = ("system", "user", "assistant")
MAX_STOP = 4           # the API's limit on stop sequences
MAX_N = 8              # choices per request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Served:
    """What the routes need to know about the model being served."""
    name: str
    tokenizer: object
    context: int                  # positions per sequence (prompt + completion)
    max_tokens: int               # the most tokens one completion may ask for
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def end_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None and self.tokenizer.eos_id >= 0 else set()
        end = self.tokenizer.special_ids.get(END_OF_TURN)
        return ids | ({end} if end is not None else set())


@dataclass
class Job:
    """A checked request: what the scheduler runs, n times."""
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stop_ids: set[int]
    stream: bool
    include_usage: bool
    n: int


# ---------------------------------------------------------------- field checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body, name, lo, hi, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a number, not {type(v).__name__} {v!r}", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, not {v}", name, "invalid_value")
    return float(v)


def _int(body, name, lo, hi, default):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise ApiError(400, f"{name} must be an integer, not {type(v).__name__} {v!r}", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, not {v}", name, "invalid_value")
    return v


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be a boolean, not {type(v).__name__} {v!r}", name, "invalid_type")
    return v


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} sequences, not {len(stops)}", "stop", "invalid_value")
    return [s for s in stops if s]


def check_model(body: dict, served: Served):
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, not {type(model).__name__}", "model", "invalid_type")
    if model != served.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served.name!r}",
                       "model", "model_not_found")


def _messages(body) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "messages is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}", f"{where}.role",
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):      # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content parts must be text parts", f"{where}.content", "invalid_value")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


def _prompt_ids(body, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        return tokenizer.encode(prompt, bos=True)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        V = tokenizer.vocab_size
        if not all(0 <= t < V for t in prompt):
            raise ApiError(400, f"prompt token ids must lie in [0, {V})", "prompt", "invalid_value")
        return list(prompt)
    raise ApiError(400, "prompt must be a string, a list of one string or a list of token ids", "prompt",
                   "invalid_type")


def _job(body: dict, served: Served, prompt_ids: list[int], param: str, stop_ids: set[int]) -> Job:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = served.context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"this model's maximum context length is {served.context} tokens; the prompt has "
                            f"{len(prompt_ids)}", param, "context_length_exceeded")
    max_tokens = _int(body, name, 1, served.max_tokens, None)
    if max_tokens is None:
        max_tokens = min(room, served.max_tokens)
    elif max_tokens > room:
        raise ApiError(400, f"this model's maximum context length is {served.context} tokens; you asked for "
                            f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} "
                            f"for the completion)", name, "context_length_exceeded")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", "top_p", "invalid_value")
    seed = _int(body, "seed", -2**63, 2**63 - 1, None)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    include_usage = _bool(options or {}, "include_usage")
    n = _int(body, "n", 1, MAX_N, 1)
    return Job(prompt_ids, max_tokens, Sampling(temperature, top_p, None if seed is None else seed % (SEED_MAX + 1)),
               _stop(body), stop_ids, stream, include_usage, n)


def parse_chat(body, served: Served) -> Job:
    _object(body)
    check_model(body, served)
    messages = _messages(body)
    # encode_chat's ids (without its loss mask, which needs a verbatim tokenizer)
    ids = served.tokenizer.encode(render(messages, add_generation_prompt=True, bos="")[0], bos=True, special=True)
    return _job(body, served, ids, "messages", served.end_ids)


def parse_completion(body, served: Served) -> Job:
    _object(body)
    check_model(body, served)
    return _job(body, served, _prompt_ids(body, served.tokenizer), "prompt", {served.tokenizer.eos_id})


def _object(body):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(rid, created, model, texts, finishes, prompt_tokens, completion_tokens) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                         "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid, created, model, index, delta: dict, finish=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_response(rid, created, model, texts, finishes, prompt_tokens, completion_tokens) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finishes))],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid, created, model, index, text: str, finish=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


class ChunkEncoder:
    """A stream's text chunks as server-sent events, the bytes json.dumps gives for completion_chunk /
    chat_chunk: the parts around the text are encoded once per choice, so a token costs the encoding of
    its own text alone."""

    MARK = "@llamac-text@"

    def __init__(self, rid, created, model, chat: bool, n: int):
        def framing(index):
            chunk = (chat_chunk(rid, created, model, index, {"content": self.MARK}) if chat
                     else completion_chunk(rid, created, model, index, self.MARK))
            head, _, tail = sse(chunk).rpartition(json.dumps(self.MARK))   # the text is the last string field
            return head, tail
        self.framing = [framing(i) for i in range(n)]

    def text(self, index: int, text: str) -> str:
        head, tail = self.framing[index]
        return head + json.dumps(text, ensure_ascii=False) + tail


def sse(obj) -> str:
    """One server-sent event carrying obj as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_chunk(rid, created, model, kind: str, prompt_tokens, completion_tokens) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def models_list(served: Served) -> dict:
    return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                        "owned_by": "llamac"}]}
