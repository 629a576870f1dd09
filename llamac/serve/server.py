"""`llamac serve`: load a checkpoint, start the engine, run uvicorn; and a server in a thread (tests, bench)."""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from llamac.config import Range
from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.serve import require_web_stack

OPTION_RANGES = {
    "--port": Range(ge=0, le=65535, note="0: any free port"),
    "--max-batch": Range(ge=1, le=256),
    "--max-tokens": Range(ge=1),
    "--max-queue": Range(ge=0),
}
GRACEFUL_SHUTDOWN_S = 10       # Ctrl-C: requests in flight get this long to finish, then are cancelled
# The engine thread waits on the GPU without the GIL; when the step is done it must get the GIL back
# from the event loop thread, which Python forces only every switch interval (5 ms by default, ten
# decode steps of a small model): a shorter one keeps the GPU fed while the loop writes many streams.
SWITCH_INTERVAL_S = 0.0005


def engine_friendly_switching():
    """Set the interpreter's switch interval for serving; returns the previous one."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return previous


def build(model, tokenizer, name: str, max_batch: int = 16, max_tokens: int | None = None, max_queue: int = 64,
          api_key: str | None = None):
    """(app, scheduler) serving `model`; the scheduler's engine thread is started."""
    from llamac.serve.steppers import make_stepper
    stepper = make_stepper(model, max_batch, model.config.max_seq_len)
    return build_for(stepper, tokenizer, name, max_tokens, max_queue, api_key)


def build_for(stepper, tokenizer, name: str, max_tokens: int | None = None, max_queue: int = 64,
              api_key: str | None = None):
    """(app, scheduler) over a stepper (llamac.serve.steppers); the scheduler's engine thread is started."""
    from llamac.serve.app import create_app
    from llamac.serve.protocol import Served
    from llamac.serve.scheduler import Scheduler
    scheduler = Scheduler(stepper, max_waiting=max_queue).start()
    context = stepper.max_len
    served = Served(name=name, tokenizer=tokenizer, context=context, max_tokens=min(max_tokens or context, context))
    return create_app(served, scheduler, api_key=api_key), scheduler


def serve_command(checkpoint, host="127.0.0.1", port=8000, device="auto", api_key=None, max_batch=16,
                  max_tokens=None, max_queue=64, model_name=None):
    """`llamac serve`: an OpenAI-compatible server for a llamac checkpoint or a Hugging Face Llama folder."""
    require_web_stack()
    import uvicorn
    for name, value in {"--port": port, "--max-batch": max_batch, "--max-tokens": max_tokens,
                        "--max-queue": max_queue}.items():
        problem = OPTION_RANGES[name].violation(value) if value is not None else None
        if problem:
            raise LlamacError(f"{name} {problem}")
    if api_key is not None and not api_key.strip():
        raise LlamacError("--api-key is empty")
    from llamac.train.checkpoint import load_model
    model, tokenizer, path = load_model(checkpoint, device=backend.resolve_device(device))
    if tokenizer is None:
        raise LlamacError(f"checkpoint {checkpoint} has no tokenizer.model")
    name = model_name or Path(checkpoint).resolve().name
    app, scheduler = build(model, tokenizer, name, max_batch, max_tokens, max_queue, api_key)
    print(f"serving {name!r} ({model.tok_embeddings.weight.device}, {scheduler.slots} slots, "
          f"{'GPU decoder' if scheduler.stepper.pipelined else 'plain path'}) on http://{host}:{port}/v1", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    engine_friendly_switching()
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.stop()


class ServerThread:
    """uvicorn serving `app` on host:port (0: a free port) in a daemon thread; `url` once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        require_web_stack()
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="llamac-serve-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LlamacError("the server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        self.thread.join(timeout)


logging.getLogger("llamac.serve").addHandler(logging.NullHandler())
