"""The server's host cost per token, on any machine: `llamac serve` over a stepper whose device is pretend.

SyntheticStepper is the host's side of the GPU stepper (llamac.serve.steppers.FastStepper) without its
arithmetic: each step takes a fixed time on a pretend device that runs the steps launched in order, one
after the other. launch() queues a step and makes two calls of a few microseconds that let go of the
GIL, as CuPy's graph launch and the tokens' copy to the host do (a CRC of 8 KiB: work, not a sleep,
which would give the core away); collect() waits for the step without the GIL, as a CUDA event does. So the engine thread and the event loop thread contend for the interpreter as they do
on a GPU host, and tokens/s through the real HTTP stack over the device's own rate (1 / step) is the
share of a step's time that the server's host work does not hide.

Rows, at the 110M and 1B step times of the GPU decoder on an H200: the device's rate (1 / step), the
scheduler alone (no HTTP: what the stepper gives), then one, 8 and 32 streaming clients through the server
(the bench's own clients, llamac.bench.serve.drive). One client's host_us_per_token is its time per token
less the scheduler's alone; device_idle_us_per_token is the pretend device's idle time per token, and
the part of it in gaps over a millisecond (device_stalled_us_per_token) is the machine's doing (a busy
machine's scheduler preempting a thread, which on a GPU host with cores to spare does not happen).
engine_cpu_us_per_token and loop_cpu_us_per_token are the two threads' CPU time per token (their own
clocks, so other work on the machine hardly moves them): while their sum stays under a step, the
device never waits for the host, whatever the machine's speed.
"""
from __future__ import annotations

import ctypes
import queue
import sys
import threading
import time
import zlib

import numpy as np

from llamac.errors import LlamacError

HOST_STEPS_MS = {"the 110M step on an H200": 0.43, "the 1B step on an H200": 2.2}   # GPU decoder, batch 1
STALL_S = 1e-3                               # a device gap this long is the machine's, not the server's
HOST_CLIENTS = (1, 8, 32)
HOST_N_NEW, HOST_REPS = 1024, 3
PR_SET_TIMERSLACK = 29
DRIVER_CALL = bytes(8192)      # zlib lets go of the GIL to checksum more than 5 KiB


def _precise_sleeps():
    """Ask Linux to wake this thread's sleeps within a microsecond (50 by default): a pretend step of
    0.43 ms must not last 0.48."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class SyntheticStepper:
    """The stepper interface (llamac.serve.steppers) over a pretend device whose every step takes step_s.
    A row's next token is a fixed function of its input (its last token unless one is given)."""

    pipelined = True
    feeds_argmax = True
    feed_max = 64

    def __init__(self, slots: int, max_len: int, vocab_size: int, step_s: float):
        from llamac.serve.steppers import FastStepper
        self.depth = FastStepper.depth
        self.slots, self.max_len, self.V, self.step_s = int(slots), int(max_len), int(vocab_size), float(step_s)
        self.last = np.zeros(self.slots, np.int64)
        self.lens = np.zeros(self.slots, np.int64)
        self.device_free_at = 0.0          # when the pretend device finishes the steps launched so far
        self.idle_s = self.stalled_s = 0.0  # the device's time with nothing to do (in gaps over STALL_S)
        self._local = threading.local()

    def _next(self, token) -> int:
        return (int(token) * 31 + 7) % self.V

    def _check(self, ids):
        if not 0 < len(ids) < self.max_len:
            raise LlamacError(f"prompt of {len(ids)} tokens does not fit a context of {self.max_len}")

    def begin(self, slot: int, ids: list[int]):
        self._check(ids)
        self.lens[slot] = 0

    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        self._check(ids)
        self.lens[slot] = len(ids)
        self.last[slot] = self._next(ids[-1])
        return self._logits(self.last[slot])

    def _logits(self, token) -> np.ndarray:
        row = np.zeros(self.V, np.float32)
        row[token] = 1.0
        return row

    def release(self, slot: int):
        self.lens[slot] = 0

    def launch(self, inputs: dict, want_logits=()):
        zlib.crc32(DRIVER_CALL)            # the graph launch: a few microseconds without the GIL
        argmax = {}
        for s, t in inputs.items():
            if self.lens[s] >= self.max_len:
                raise LlamacError(f"slot {s} is full ({self.max_len} positions)")
            self.last[s] = self._next(self.last[s] if t is None else t)
            self.lens[s] += 1
            argmax[s] = int(self.last[s])
        zlib.crc32(DRIVER_CALL)            # the tokens' copy to the host
        now = time.perf_counter()
        if 0 < self.device_free_at < now:  # the device ran dry before this launch
            gap = now - self.device_free_at
            self.idle_s += gap
            self.stalled_s += gap if gap >= STALL_S else 0.0
        self.device_free_at = max(now, self.device_free_at) + self.step_s
        return self.device_free_at, argmax, {s: self._logits(argmax[s]) for s in want_logits}

    def collect(self, handle):
        done, argmax, logits = handle
        if not getattr(self._local, "precise", False):
            _precise_sleeps()
            self._local.precise = True
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return argmax, logits


def scheduler_alone(step_s: float, n_new: int) -> float:
    """Tokens/s of one request through the scheduler over the synthetic stepper, no HTTP."""
    from llamac.serve.scheduler import Request, Scheduler
    scheduler = Scheduler(SyntheticStepper(1, n_new + 32, 32000, step_s)).start()
    try:
        done = queue.Queue()
        start = time.perf_counter()
        scheduler.submit(Request(list(range(1, 17)), n_new,
                                 on_event=lambda token, finish: finish is not None and done.put(finish)))
        done.get(timeout=600)
        return n_new / (time.perf_counter() - start)
    finally:
        scheduler.stop()


def bench_serve_host(steps_ms: dict | None = None, clients=HOST_CLIENTS, n_new: int = HOST_N_NEW,
                     reps: int = HOST_REPS) -> list[dict]:
    """For each step time ({label: ms}): the device's rate, the scheduler alone, then each client count
    through the server (the best of `reps` runs: other work on the machine only ever slows a run down)."""
    from llamac.bench.serve import MODEL, PROMPT_LEN, IdTokenizer, drive, summarise, web_stack
    from llamac.serve.server import ServerThread, build_for, engine_friendly_switching
    rows = []
    rng = np.random.default_rng(0)
    V = 32000
    prompts = [rng.integers(0, V, PROMPT_LEN).tolist() for _ in range(max(clients))]
    stack = web_stack()
    for label, ms in (steps_ms or HOST_STEPS_MS).items():
        step_s = ms / 1e3
        head = {"section": "serve", "shape": f"synthetic {ms} ms", "as_of": label}
        device = 1 / step_s
        alone = max(scheduler_alone(step_s, n_new) for _ in range(reps))
        rows.append({**head, "impl": "pretend device", "case": "1 / step", "tokens_per_s": round(device, 1)})
        rows.append({**head, "impl": "scheduler, no HTTP", "case": "1 client", "tokens_per_s": round(alone, 1),
                     "vs_device": round(alone / device, 3)})
        stepper = SyntheticStepper(max(clients), PROMPT_LEN + n_new + 32, V, step_s)
        app, scheduler = build_for(stepper, IdTokenizer(V), MODEL, max_queue=0)
        server = ServerThread(app).start()
        switching = engine_friendly_switching()
        try:
            def bodies(n, tokens):
                return [{"model": MODEL, "prompt": p, "max_tokens": tokens, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}} for p in prompts[:n]]

            clocks = {"engine": scheduler._thread.ident, "loop": server.thread.ident}

            def cpu_seconds() -> dict:
                return {name: time.clock_gettime(time.pthread_getcpuclockid(ident)) for name, ident in clocks.items()}

            def run(c):
                stepper.idle_s = stepper.stalled_s = stepper.device_free_at = 0.0   # the gap before a run is not idle
                before = cpu_seconds()
                figures = summarise(drive(server.host, server.port, bodies(c, n_new)))
                after = cpu_seconds()
                tokens = max(figures["tokens"], 1)
                return {**figures, "device_idle_us_per_token": round(stepper.idle_s / tokens * 1e6, 1),
                        "device_stalled_us_per_token": round(stepper.stalled_s / tokens * 1e6, 1),
                        **{f"{name}_cpu_us_per_token": round((after[name] - before[name]) / tokens * 1e6, 1)
                           for name in clocks}}

            drive(server.host, server.port, bodies(max(clients), 8))          # warm-up
            for c in clients:
                runs = [run(c) for _ in range(reps)]
                best = max(runs, key=lambda r: r["tokens_per_s"])
                row = {**head, "impl": "llamac serve", "case": f"{c} client{'s' * (c > 1)}", "clients": c,
                       "web_stack": stack, **best, "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}
                if c == 1:
                    row["vs_alone"] = round(best["tokens_per_s"] / alone, 3)
                    row["vs_device"] = round(best["tokens_per_s"] / device, 3)
                    row["host_us_per_token"] = round((1 / best["tokens_per_s"] - 1 / alone) * 1e6, 1)
                else:
                    row["vs_device"] = round(best["tokens_per_s"] / (c * device), 3)
                rows.append(row)
        finally:
            sys.setswitchinterval(switching)
            server.stop()
            scheduler.stop()
    return rows


if __name__ == "__main__":   # python -m llamac.bench.serve_host [ms,ms...]: the rows as JSON lines
    import json
    steps = {f"given ({ms} ms)": float(ms) for ms in sys.argv[1].split(",")} if len(sys.argv) > 1 else None
    for r in bench_serve_host(steps):
        print(json.dumps(r), flush=True)
