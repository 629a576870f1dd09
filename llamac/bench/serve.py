"""`llamac bench --what serve`: `llamac serve` on the GPU under 1 / 8 / 32 concurrent streaming clients
(the server's own host cost per token, on any machine, is llamac.bench.serve_host's).

The server runs in this process (uvicorn in a thread, the engine in another) on the GPU decoder, at the
110M shape of `bench --what decode` and TinyLlama's 1.1B shape, random bf16 weights. The clients run in
a child process (so they take no share of the server's interpreter), each streaming one completion of
256 greedy tokens after a 16-token prompt over plain HTTP/1.1, all started together. Per shape and
client count: aggregate tokens/s (every client's tokens over the wall time from the first request to
the last token), time to first token and inter-token latency (p50 / p99 over all clients), and, in the
same process, `llamac generate`'s batch-1 path (FastDecoder.generate) on the same weights.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import sys
import time

import numpy as np

from llamac.engine import backend
from llamac.errors import LlamacError

SERVE_SHAPES = {   # dim, layers, heads, kv heads, vocab, hidden
    "110M": (768, 12, 12, 12, 32000, 2048),
    "1B": (2048, 22, 32, 4, 32000, 5632),      # TinyLlama-1.1B
}
CLIENTS = (1, 8, 32)
N_NEW, PROMPT_LEN, CACHE_LEN = 256, 16, 1024
STEP_TIMING = 200              # graph replays timed for a step's GPU time (the cache stays under CACHE_LEN)
MODEL = "bench"


class IdTokenizer:
    """Token ids as text (" id" each, so a client can count them) and no end token: random weights never
    stop early."""

    eos_id = -1
    special_ids: dict = {}

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return "".join(f" {int(i)}" for i in ids)

    def encode(self, text, bos=True, special=False):
        raise LlamacError("the serve bench sends its prompts as token ids")


def shape_config(name: str):
    from llamac.config import ModelConfig
    dim, L, H, KV, V, hid = SERVE_SHAPES[name]
    return ModelConfig(dim=dim, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=V, hidden_dim=hid,
                       max_seq_len=CACHE_LEN, tie_embeddings=False)


# ---------------------------------------------------------------- the clients (child process)

async def _stream(host: str, port: int, body: dict):
    """One streamed completion over HTTP/1.1: (time sent, arrival time of each token, usage tokens)."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    sent = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(data)) + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise LlamacError(f"the server answered {status.decode().strip()}: {(await reader.read()).decode()[:200]}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    arrivals, usage, buf = [], None, b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)      # chunked transfer encoding
        if size == 0:
            break
        buf += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            payload = event[len(b"data: "):]
            if payload == b"[DONE]":
                continue
            obj = json.loads(payload)
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                # IdTokenizer's text is " id" per token; a reader behind the engine gets several in a chunk
                arrivals += [time.perf_counter()] * obj["choices"][0]["text"].count(" ")
    writer.close()
    return sent, arrivals, usage


async def _clients(host, port, bodies):
    return await asyncio.gather(*(_stream(host, port, b) for b in bodies))


def _client_process(host, port, bodies, out):
    try:
        out.put(("ok", asyncio.run(_clients(host, port, bodies))))
    except Exception as exc:          # reported to the parent, which raises it
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def drive(host: str, port: int, bodies: list[dict], timeout: float = 600.0):
    """Run one streaming client per body, together, in a child process; their results."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(host, port, bodies, out), daemon=True)
    proc.start()
    try:
        kind, result = out.get(timeout=timeout)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if kind != "ok":
        raise LlamacError(f"serve bench clients failed: {result}")
    return result


# ---------------------------------------------------------------- the figures

def _pct(xs, q):
    return round(float(np.percentile(xs, q)) * 1e3, 3) if len(xs) else float("nan")


def summarise(results) -> dict:
    """Aggregate tokens/s, time to first token and inter-token latency (ms) of one run of clients."""
    start = min(sent for sent, _, _ in results)
    end = max(arr[-1] for _, arr, _ in results if arr)
    tokens = sum(len(arr) for _, arr, _ in results)
    ttft = [arr[0] - sent for sent, arr, _ in results if arr]
    itl = np.concatenate([np.diff(arr) for _, arr, _ in results if len(arr) > 1] or [np.zeros(0)])
    return {"tokens_per_s": round(tokens / (end - start), 1), "tokens": tokens,
            "usage_tokens": sum(u or 0 for _, _, u in results),
            "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
            "itl_ms_p50": _pct(itl, 50), "itl_ms_p99": _pct(itl, 99)}


def web_stack() -> str:
    """uvicorn's event loop and HTTP parser in this environment (it takes uvloop and httptools when present)."""
    import importlib.util
    found = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is not None]
    return "uvicorn + " + (" + ".join(found) if found else "asyncio + h11")


def generate_batch1(cfg, state, prompt, n_new: int, reps: int = 3) -> tuple[float, float]:
    """`llamac generate`'s GPU path at batch 1 (FastDecoder.generate): tokens/s from call to last token,
    and the GPU time of one of its decode steps (ms)."""
    from llamac.infer.decode import FastDecoder
    dec = FastDecoder(cfg, state, batch=1, max_len=CACHE_LEN)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        n = sum(1 for _ in dec.generate([prompt], n_new, temperature=0.0))
        times.append(time.perf_counter() - t0)
    dec.start([prompt])
    step_ms = dec.decode_seconds(STEP_TIMING) / STEP_TIMING * 1e3
    return round(n / float(np.median(times[1:])), 1), round(step_ms, 4)


def stepper_step_ms(stepper, prompt) -> float:
    """The GPU time of one step of the server's stepper over its first row alone (one client's step), so
    that a gap to `generate` can be told apart: the device's step, or the host's work around it."""
    cp = stepper.cp
    stepper.begin(0, prompt)
    graph = stepper.graphs[0][1]
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stepper.stream)
    for _ in range(STEP_TIMING):
        graph.launch(stepper.stream)
    end.record(stepper.stream)
    end.synchronize()
    stepper.release(0)
    return round(cp.cuda.get_elapsed_time(start, end) / STEP_TIMING, 4)


def bench_serve_shape(name: str, clients=CLIENTS, n_new: int = N_NEW, prompt_len: int = PROMPT_LEN) -> list[dict]:
    from llamac.infer.packed import random_state
    from llamac.serve.server import ServerThread, build_for, engine_friendly_switching
    from llamac.serve.steppers import FastStepper
    cp = backend.cupy_module()
    cfg = shape_config(name)
    state = random_state(cfg, cp)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(max(clients))]
    generated, generate_step = generate_batch1(cfg, state, prompts[0], n_new)
    rows = [{"section": "serve", "shape": name, "impl": "llamac generate (batch 1)", "case": "1 client",
             "tokens_per_s": generated, "device_step_ms": generate_step}]
    stepper = FastStepper(cfg, state, slots=max(clients), max_len=CACHE_LEN)
    server_step = stepper_step_ms(stepper, prompts[0])
    app, scheduler = build_for(stepper, IdTokenizer(cfg.vocab_size), MODEL, max_queue=0)
    server = ServerThread(app).start()
    switching = engine_friendly_switching()
    try:
        def bodies(n, tokens):
            return [{"model": MODEL, "prompt": p, "max_tokens": tokens, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}} for p in prompts[:n]]

        drive(server.host, server.port, bodies(max(clients), 8))          # warm-up: every path once
        stack = web_stack()
        one = None
        for c in clients:
            row = {"section": "serve", "shape": name, "impl": "llamac serve", "case": f"{c} clients",
                   "clients": c, "web_stack": stack, **summarise(drive(server.host, server.port, bodies(c, n_new)))}
            if c == 1:
                one = row["tokens_per_s"]
                row["vs_generate"] = round(one / rows[0]["tokens_per_s"], 3)
                row["device_step_ms"] = server_step      # the stepper's step alone: generate's is rows[0]'s
            elif one:
                row["vs_one_client"] = round(row["tokens_per_s"] / one, 2)
            rows.append(row)
    finally:
        sys.setswitchinterval(switching)
        server.stop()
        scheduler.stop()
    return rows


def bench_serve(shapes=None, clients=CLIENTS, n_new: int = N_NEW) -> list[dict]:
    if not backend.cuda_available():
        raise LlamacError("bench --what serve's GPU shapes need a CUDA GPU (--device cuda); "
                          "--device cpu measures the server's host cost alone")
    from llamac.serve import require_web_stack
    require_web_stack()
    rows = []
    for name in shapes or SERVE_SHAPES:
        rows += bench_serve_shape(name, clients, n_new)
    return rows


if __name__ == "__main__":   # python -m llamac.bench.serve [shapes]: the rows as JSON lines
    for r in bench_serve(sys.argv[1].split(",") if len(sys.argv) > 1 else None):
        print(json.dumps(r), flush=True)
