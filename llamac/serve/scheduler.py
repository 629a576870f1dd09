"""Continuous batching, independent of HTTP: requests join and leave a shared decode step between steps.

A `Scheduler` owns one engine thread and a stepper (llamac.serve.steppers) with a fixed number of
slots. Each turn of its loop it drops cancelled requests, prefills waiting ones into free slots (their
first token comes from the prefill's logits), runs one decode step for every live slot and hands
each request its token through `Request.on_event`, called on the engine thread.

Each slot has its own position and KV cache length. The steppers keep a sequence's arithmetic
independent of what else is in the batch, so a greedy answer is the same token for token alone or
among fifteen others; sampling draws from the request's own generator (seeded by its `seed`), so a
seeded answer does not depend on the batch either.

On the GPU, while every live request is greedy (the device then feeds each row its own argmax), up to
`stepper.depth` steps are in flight: the engine launches the next steps, hands the event loop the
tokens it read last, and only then waits for the oldest step. The loop's work (text, JSON, HTTP) runs
while the engine waits on the device without the GIL, and when the loop holds the GIL at the moment a
step ends, the device still has the steps queued behind it: the host's work overlaps the device's
instead of adding to it.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from llamac.errors import LlamacError
from llamac.infer.generate import sample_next

log = logging.getLogger("llamac.serve")

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


class Busy(LlamacError):
    """Every slot and every place in the queue is taken."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Request:
    """One sequence to generate. on_event(token, finish_reason) is called on the engine thread: once
    per new token (finish_reason None), then once with token None and the reason it ended."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), on_event: Callable[[Optional[int], Optional[str]], None] | None = None):
        if not prompt_ids:
            raise LlamacError("empty prompt: nothing to condition on")
        if max_tokens < 1:
            raise LlamacError(f"max_tokens must be at least 1, not {max_tokens}")
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = int(max_tokens)
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.on_event = on_event or (lambda token, finish: None)
        self.sampled = 0                  # tokens drawn, stop tokens included
        self.tokens: list[int] = []       # tokens handed out (no stop token)
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self.fed = 0                      # prompt tokens in the cache (or on their way there)
        self.pending = 0                  # steps in flight whose output is this request's next token
        self.rng = np.random.default_rng(sampling.seed)

    def cancel(self):
        """Ask the engine to drop this request at the next step boundary (safe from any thread)."""
        self.cancelled = True


class Scheduler:
    """The continuous-batching loop over a stepper's slots; `max_waiting` requests may queue for a slot."""

    def __init__(self, stepper, max_waiting: int = 64, on_step: Callable[[], None] | None = None):
        """on_step: called on the engine thread after each turn that handed out events (to wake their readers once)."""
        self.stepper = stepper
        self.on_step = on_step
        self.slots = stepper.slots
        self.max_len = stepper.max_len
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._inputs: dict[int, Optional[int]] = {}   # slot -> next input token; None: the stepper feeds its argmax
        self.depth = max(1, int(stepper.depth)) if stepper.pipelined else 1   # steps in flight at most
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.peak = 0                                   # the most requests one step has decoded
        self.finished: collections.Counter = collections.Counter()   # finish reason -> requests

    # ------------------------------------------------------------ from any thread

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llamac-serve-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise LlamacError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                              f"exceeds the context ({self.max_len})")
        with self._cv:
            if self._stopping:
                raise Busy("the server is shutting down")
            if len(self._waiting) + len(self._active) >= self.slots + self.max_waiting:
                raise Busy(f"all {self.slots} slots and {self.max_waiting} queue places are taken")
            self._waiting.append(request)
            self._cv.notify()
        return request

    def cancel(self, request: Request):
        request.cancel()
        with self._cv:
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(requests decoding, requests waiting for a slot)."""
        with self._cv:
            return len(self._active), len(self._waiting)

    def stop(self, timeout: float = 30.0):
        """End the loop; requests still waiting or decoding end with finish_reason 'cancelled'."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ the engine thread

    def _finish(self, request: Request, reason: str):
        if request.finish_reason is None:
            request.finish_reason = reason
            self.finished[reason] += 1
            try:
                request.on_event(None, reason)
            except Exception:      # a listener's failure must not stop the engine
                log.exception("on_event failed")

    def _release(self, slot: int, reason: str):
        request = self._active.pop(slot)
        self._inputs.pop(slot, None)
        self.stepper.release(slot)
        self._finish(request, reason)

    def _take(self, request: Request, slot: int, logits: Optional[np.ndarray], argmax: int) -> bool:
        """Hand out the token chosen for `request`; False when the request is done (its slot freed)."""
        if request.sampling.greedy:
            token = int(argmax)
        else:
            s = request.sampling
            token = int(sample_next(logits[None].astype(np.float32), s.temperature, None, s.top_p, request.rng)[0])
        request.sampled += 1
        if token in request.stop_ids:
            self._release(slot, FINISH_STOP)
            return False
        request.tokens.append(token)
        try:
            request.on_event(token, None)
        except Exception:
            log.exception("on_event failed")
            request.cancel()
        if request.sampled >= request.max_tokens:
            self._release(slot, FINISH_LENGTH)
            return False
        self._inputs[slot] = None if request.sampling.greedy and self.stepper.feeds_argmax else token
        return True

    def _admit(self) -> bool:
        """Prefill waiting requests into free slots, drop cancelled ones. False when stopping."""
        if not self._active and not self._waiting:
            self._stepped()                      # the last tokens go out before the engine sleeps
        with self._cv:
            while not self._stopping and not self._waiting and not self._active:
                self._cv.wait()
            if self._stopping:
                return False
            for slot in [s for s, r in self._active.items() if r.cancelled]:
                self._release(slot, FINISH_CANCELLED)
            admitted = []
            if self._waiting:
                free = [s for s in range(self.slots) if s not in self._active]
                while free and self._waiting:
                    request = self._waiting.popleft()
                    if request.cancelled:
                        self._finish(request, FINISH_CANCELLED)
                        continue
                    slot = free.pop(0)
                    self._active[slot] = request
                    admitted.append((slot, request))
        for slot, request in admitted:
            if len(request.prompt_ids) <= self.stepper.feed_max:
                self.stepper.begin(slot, request.prompt_ids)     # the prompt goes through the shared steps
                continue
            logits = self.stepper.prefill(slot, request.prompt_ids)
            request.fed = len(request.prompt_ids)
            self._take(request, slot, logits, int(np.argmax(logits)))
        return True

    def _launch(self):
        """One step for every request that needs one: (handle, {slot: (request, whether the output is its
        next token)}), or None when every request has all its tokens on the way already."""
        inputs, launched, want = {}, {}, set()
        for slot, request in self._active.items():
            if request.fed < len(request.prompt_ids):     # a prompt token: its output matters only for the last
                inputs[slot] = request.prompt_ids[request.fed]
                request.fed += 1
                counts = request.fed == len(request.prompt_ids)
            elif request.sampled + request.pending < request.max_tokens:
                inputs[slot] = self._inputs.get(slot)
                counts = True
            else:
                continue
            if counts:
                request.pending += 1
                if not request.sampling.greedy:
                    want.add(slot)
            launched[slot] = (request, counts)
        if not inputs:
            return None
        handle = self.stepper.launch(inputs, want)
        self.steps += 1
        self.peak = max(self.peak, len(launched))
        return handle, launched

    def _can_look_ahead(self) -> bool:
        """Whether the next step's inputs are known before the steps in flight are read: every live request
        greedy (the stepper feeds its argmax) or still in its prompt."""
        return all(r.sampling.greedy and (r.fed < len(r.prompt_ids) or self._inputs.get(s) is None)
                   for s, r in self._active.items())

    def _fill(self, inflight: collections.deque):
        """Launch steps until `depth` are in flight, or the next one's inputs are not known yet."""
        while len(inflight) < self.depth and self._active and (not inflight or self._can_look_ahead()):
            step = self._launch()
            if step is None:
                return
            inflight.append(step)

    def _collect(self, step):
        handle, launched = step
        argmax, logits = self.stepper.collect(handle)
        for slot, (request, counts) in launched.items():
            if not counts:
                continue           # a prompt token's output
            request.pending -= 1
            if self._active.get(slot) is not request or request.cancelled:
                continue           # a request that left while the step ran
            self._take(request, slot, logits.get(slot), argmax[slot])

    def _run(self):
        inflight: collections.deque = collections.deque()
        try:
            while True:
                try:
                    if not self._admit():
                        break
                    self._fill(inflight)
                    if self.depth > 1:
                        self._stepped()       # the last tokens go out while the device runs the next steps
                    if inflight:
                        self._collect(inflight.popleft())
                    if self.depth == 1:
                        self._stepped()
                except Exception as exc:   # the engine keeps serving: the requests in flight end with an error
                    log.exception("decode step failed")
                    inflight.clear()
                    with self._cv:
                        for slot in list(self._active):
                            self._release(slot, FINISH_ERROR)
                    self._stepped()
                    if isinstance(exc, MemoryError):
                        raise
        finally:
            with self._cv:
                self._stopping = True
                for slot in list(self._active):
                    self._release(slot, FINISH_CANCELLED)
                while self._waiting:
                    self._finish(self._waiting.popleft(), FINISH_CANCELLED)
            self._stepped()

    def _stepped(self):
        if self.on_step is not None:
            try:
                self.on_step()
            except Exception:
                log.exception("on_step failed")
