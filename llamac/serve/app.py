"""The HTTP side of `llamac serve`: FastAPI routes over a Scheduler, OpenAI's request and response shapes.

    POST /v1/chat/completions   the checkpoint's chat template; stream: server-sent events ending in [DONE]
    POST /v1/completions
    GET  /v1/models, /health

Bad requests get a 4xx with the API's error object; anything unexpected a 500 with one (the traceback
goes to the log, never to the client), and the server keeps serving. A client that goes away frees its
slot at the next step boundary.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import time

from llamac.errors import LlamacError
from llamac.serve import require_web_stack
from llamac.serve.protocol import (ApiError, ChunkEncoder, Job, Served, chat_chunk, chat_response,
                                   completion_chunk, completion_response, error_body, models_list, new_id,
                                   parse_chat, parse_completion, sse, usage_chunk)
from llamac.serve.scheduler import FINISH_CANCELLED, FINISH_ERROR, Busy, Request, Scheduler
from llamac.serve.text import TextStream

require_web_stack()

from fastapi import FastAPI                                            # noqa: E402
from fastapi import Request as HttpRequest                             # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse          # noqa: E402
from starlette.exceptions import HTTPException                         # noqa: E402

log = logging.getLogger("llamac.serve")

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.5


def _error(status: int, message: str, kind="invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


class Dispatcher:
    """Events from the engine thread to the event loop: queued as they come, handed over once per step
    (one wake-up of the loop per step, not one per token)."""

    def __init__(self):
        self.loop = None
        self.pending: collections.deque = collections.deque()
        self.scheduled = False

    def post(self, choices: "Choices", event):
        self.pending.append((choices, event))

    def wake(self):
        """Engine thread, after a step."""
        if self.pending and not self.scheduled and self.loop is not None:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:            # the loop has closed: nobody is listening any more
                self.pending.clear()

    def _drain(self):
        self.scheduled = False              # before the pops: an event posted meanwhile gets its own wake-up
        woken = set()
        while self.pending:
            choices, event = self.pending.popleft()
            choices.inbox.append(event)
            woken.add(choices)
        for choices in woken:
            choices.wake()


class Choices:
    """The n scheduler requests of one API request, their events merged on the event loop's side."""

    def __init__(self, job: Job, served: Served, scheduler: Scheduler, dispatcher: Dispatcher):
        self.inbox: list = []             # (index, token, finish) events handed over, not yet read
        self.gone = False                 # the client has disconnected
        self.waiter: asyncio.Future | None = None
        self.texts = [TextStream(served.tokenizer, job.prompt_ids, job.stop) for _ in range(job.n)]
        self.finish = [None] * job.n
        self.requests = []
        self.scheduler = scheduler
        for i in range(job.n):
            sampling = job.sampling
            if job.n > 1 and sampling.seed is not None:
                sampling = type(sampling)(sampling.temperature, sampling.top_p, sampling.seed + i)
            on_event = (lambda i: lambda token, finish: dispatcher.post(self, (i, token, finish)))(i)
            self.requests.append(Request(job.prompt_ids, job.max_tokens, sampling, job.stop_ids, on_event))
        try:
            for r in self.requests:
                scheduler.submit(r)
        except Busy:
            self.cancel()
            raise

    def wake(self):
        """Event loop: events have arrived, or the client has gone."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def cancel(self):
        for r in self.requests:
            if r.finish_reason is None:
                self.scheduler.cancel(r)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    def _apply(self, index, token, finish):
        """(text, finish_reason or None) of one engine event."""
        text = self.texts[index]
        if token is not None:
            out, stopped = text.push(token)
            if stopped:
                self.scheduler.cancel(self.requests[index])
                self.finish[index] = "stop"
                return out, "stop"
            return out, None
        if finish in (FINISH_CANCELLED, FINISH_ERROR):
            raise ApiError(503 if finish == FINISH_CANCELLED else 500,
                           "the server is shutting down" if finish == FINISH_CANCELLED
                           else "generation failed on the server", None, None, "server_error")
        self.finish[index] = finish
        return text.finish(), finish

    async def _watch(self, is_disconnected):
        """Poll for a client that has gone (one task per request, not a timer per token)."""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await is_disconnected():
                self.cancel()
                self.gone = True
                self.wake()
                return

    async def events(self, is_disconnected):
        """Yield (index, text, finish_reason or None) until every choice has finished. Events already
        waiting are merged into one piece of text per choice: a reader that falls behind catches up."""
        watcher = asyncio.ensure_future(self._watch(is_disconnected))
        loop = asyncio.get_running_loop()
        try:
            while not all(self.finish):
                if not self.inbox and not self.gone:
                    self.waiter = loop.create_future()
                    await self.waiter
                    self.waiter = None
                if self.gone:
                    return
                batch, self.inbox = self.inbox, []
                merged: dict = {}
                for index, token, finish in batch:
                    if self.finish[index]:
                        continue
                    out, reason = self._apply(index, token, finish)
                    entry = merged.setdefault(index, ["", None])
                    entry[0] += out
                    entry[1] = reason or entry[1]
                for index, (text, reason) in merged.items():
                    if text or reason:
                        yield index, text, reason
        finally:
            watcher.cancel()


class Guard:
    """ASGI middleware: the API key and the body size limit, checked before a route runs (plain ASGI, so
    streamed responses pass through it untouched)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            if self.expected is not None and not secrets.compare_digest(headers.get(b"authorization", b""),
                                                                        self.expected):
                refusal = _error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key")
            length = headers.get(b"content-length")
            if refusal is None and length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                refusal = _error(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(served: Served, scheduler: Scheduler, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over a started scheduler; it takes the scheduler's on_step hook."""
    app = FastAPI(title="llamac", docs_url=None, redoc_url=None, openapi_url=None)
    dispatcher = Dispatcher()
    scheduler.on_step = dispatcher.wake

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), code=None if exc.status_code != 404 else "not_found")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(LlamacError)
    async def llamac_error(request, exc: LlamacError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        log.exception("request failed", exc_info=exc)
        return _error(500, "internal server error", kind="server_error")

    async def read_json(request):
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None

    @app.get("/health")
    async def health():
        active, waiting = scheduler.load()
        return {"status": "ok", "model": served.name, "active": active, "waiting": waiting, "slots": scheduler.slots}

    @app.get("/v1/models")
    async def models():
        return models_list(served)

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != served.name:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return models_list(served)["data"][0]

    async def run(request, job: Job, chat: bool):
        dispatcher.loop = asyncio.get_running_loop()
        try:
            choices = Choices(job, served, scheduler, dispatcher)
        except Busy as exc:
            raise ApiError(429, f"the server is busy: {exc}", None, "rate_limit_exceeded", "rate_limit_error")
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        prompt_tokens = len(job.prompt_ids)
        if not job.stream:
            texts = [""] * job.n
            try:
                async for index, text, _ in choices.events(request.is_disconnected):
                    texts[index] += text
            finally:
                choices.cancel()
            build = chat_response if chat else completion_response
            return build(rid, created, served.name, texts, choices.finish, prompt_tokens, choices.completion_tokens)

        chunks = ChunkEncoder(rid, created, served.name, chat, job.n)

        async def stream():
            try:
                if chat:
                    for i in range(job.n):
                        yield sse(chat_chunk(rid, created, served.name, i, {"role": "assistant", "content": ""}))
                async for index, text, finish in choices.events(request.is_disconnected):
                    if finish is None:
                        yield chunks.text(index, text)
                    elif chat:
                        if text:
                            yield chunks.text(index, text)
                        yield sse(chat_chunk(rid, created, served.name, index, {}, finish))
                    else:
                        yield sse(completion_chunk(rid, created, served.name, index, text, finish))
                if job.include_usage:
                    yield sse(usage_chunk(rid, created, served.name, "chat.completion.chunk" if chat else
                                          "text_completion", prompt_tokens, choices.completion_tokens))
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield sse(exc.body())
            finally:
                choices.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await run(request, parse_chat(await read_json(request), served), chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await run(request, parse_completion(await read_json(request), served), chat=False)

    return app
