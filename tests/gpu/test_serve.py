"""The serving engine on the GPU decoder: a greedy answer is the same in any slot, alone or among 31 others
(two groups of 16 rows), and equals FastDecoder.generate's; the look-ahead step; over HTTP when the serve
extra is installed."""
import threading
import time

import numpy as np
import pytest

import llamac
from llamac.config import ModelConfig
from llamac.infer import decode
from llamac.model.llama import Llama
from llamac.serve.scheduler import Request, Sampling, Scheduler
from llamac.serve.steppers import FastStepper, make_stepper
from tests.test_serve_scheduler import collect

TIMEOUT = 120
SLOTS = 32


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, max_seq_len=256, hidden_dim=200)
    llamac.manual_seed(0)
    m = Llama(cfg)
    rng = np.random.default_rng(0)
    for _, p in m.named_parameters():     # far from init: logits well apart, answers that vary
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.2
    return m.to("cuda", "bfloat16").eval()


def prompts(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, int(rng.integers(2, 30))).tolist() for _ in range(n)]


def test_the_server_takes_the_gpu_decoder(model):
    assert isinstance(make_stepper(model, 4), FastStepper)


def test_a_prefilled_answer_is_fastdecoder_generates(model):
    """With the prompt prefilled (feed_max 0), a slot computes what FastDecoder.generate does."""
    target = [7, 100, 3, 55, 21]
    dec = decode.FastDecoder.from_model(model, batch=decode.MAX_BATCH, max_len=256)
    reference = [int(r[0]) for r in dec.generate([target], 40, temperature=0.0)]
    stepper = FastStepper(model.config, model.state_dict(), 16, 256)
    stepper.feed_max = 0
    sched = Scheduler(stepper).start()
    try:
        assert collect(sched, Request(target, 40))[0] == reference
    finally:
        sched.stop()


@pytest.mark.parametrize("feed_max", [FastStepper.feed_max, 0])
def test_greedy_answer_is_the_same_alone_in_any_slot_and_among_others(model, feed_max):
    target = [7, 100, 3, 55, 21]
    stepper = FastStepper(model.config, model.state_dict(), SLOTS, 256)
    stepper.feed_max = feed_max
    sched = Scheduler(stepper, max_waiting=64).start()
    try:
        reference = collect(sched, Request(target, 40))[0]
        ps = prompts(SLOTS - 1)
        lengths = [int(k) for k in np.random.default_rng(2).integers(5, 60, SLOTS - 1)]
        alone = [collect(sched, Request(p, k))[0] for p, k in zip(ps, lengths)]
        for position in (0, 17, SLOTS - 1):          # started early, midway, last: other slots, other groups
            out = {}
            others = [threading.Thread(target=lambda i=i: out.__setitem__(i, collect(sched, Request(ps[i], lengths[i]))[0]))
                      for i in range(SLOTS - 1)]
            order = others[:position] + [threading.Thread(
                target=lambda: out.__setitem__("target", collect(sched, Request(target, 40))[0]))] + others[position:]
            gate, held = threading.Event(), threading.Event()     # the engine waits until all 32 are queued
            sched.submit(Request([1, 2], 2, on_event=lambda t, f: held.set() or gate.wait(TIMEOUT)))
            assert held.wait(TIMEOUT)
            for t in order:
                t.start()
            deadline = time.time() + TIMEOUT
            while sched.load()[1] < SLOTS and time.time() < deadline:
                time.sleep(0.01)
            gate.set()
            for t in order:
                t.join(TIMEOUT)
            assert out["target"] == reference
            assert [out[i] for i in range(SLOTS - 1)] == alone
        assert sched.peak == SLOTS              # both groups of 16 rows full
    finally:
        sched.stop()


def test_sampled_and_greedy_requests_together(model):
    """Sampled rows are drawn on the host (no look-ahead then): seeded answers repeat, greedy ones are unchanged."""
    sched = Scheduler(FastStepper(model.config, model.state_dict(), 16, 256)).start()
    try:
        greedy = collect(sched, Request([5, 6, 7], 30))[0]
        sampled = collect(sched, Request([5, 6, 7], 30, Sampling(0.8, 0.9, 3)))[0]
        out = {}
        threads = [threading.Thread(target=lambda: out.__setitem__("g", collect(sched, Request([5, 6, 7], 30))[0])),
                   threading.Thread(target=lambda: out.__setitem__(
                       "s", collect(sched, Request([5, 6, 7], 30, Sampling(0.8, 0.9, 3)))[0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert out == {"g": greedy, "s": sampled}
    finally:
        sched.stop()


def test_serve_bench_at_a_tiny_shape(monkeypatch):
    """`bench --what serve`'s whole path (server, clients, figures) at a small shape."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from llamac.bench import serve
    monkeypatch.setitem(serve.SERVE_SHAPES, "tiny", (96, 2, 6, 2, 300, 200))
    rows = serve.bench_serve(["tiny"], clients=(1, 4), n_new=16)
    served = [r for r in rows if r["impl"] == "llamac serve"]
    assert [r["tokens"] for r in served] == [16, 64] and [r["usage_tokens"] for r in served] == [16, 64]
    assert all(np.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["device_step_ms"] > 0 and served[0]["device_step_ms"] > 0     # generate's step, the stepper's
