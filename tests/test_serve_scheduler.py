"""The serving engine without HTTP: batch invariance of the plain step, the scheduler's joins, leaves,
limits and stops, and the text stream's stop sequences."""
import queue
import threading
import time

import numpy as np
import pytest

from llamac.config import ModelConfig
from llamac.errors import LlamacError
from llamac.infer.generate import generate_ids
from llamac.model.llama import Llama
from llamac.serve.scheduler import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Busy, Request, Sampling, Scheduler
from llamac.serve.steppers import PlainStepper
from llamac.serve.text import TextStream

TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)
    m = Llama(cfg)
    rng = np.random.default_rng(0)
    for _, p in m.named_parameters():       # weights far from init: well-separated logits
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.3
    return m


def prompts(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 97, int(rng.integers(1, 12))).tolist() for _ in range(n)]


def test_plain_step_logits_do_not_depend_on_the_other_rows(model):
    """Bit for bit: a sequence's logits alone equal its logits among other live slots at other positions."""
    target = [5, 17, 3, 40]

    def run(others):
        st = PlainStepper(model, slots=6)
        rows = [st.prefill(0, target)]
        for slot, ids in enumerate(others, start=1):
            st.prefill(slot, ids)
        for _ in range(6):
            live = {0: None, **{s: None for s in range(1, len(others) + 1)}}
            argmax, logits = st.launch(live, want_logits={0})
            rows.append(logits[0])
        return np.stack(rows)

    alone = run([])
    crowded = run(prompts(5))
    assert np.array_equal(alone, crowded)
    # and it is the model's own computation: the plain generate path gives the same greedy tokens
    assert [int(np.argmax(r)) for r in alone] == list(generate_ids(model, target, 7, temperature=0))


def collect(scheduler, request):
    events = queue.Queue()
    request.on_event = lambda token, finish: events.put((token, finish))
    scheduler.submit(request)
    tokens = []
    while True:
        token, finish = events.get(timeout=TIMEOUT)
        if token is None:
            return tokens, finish
        tokens.append(token)


def test_sixteen_concurrent_requests_give_the_answers_they_get_alone(model):
    ps = prompts(16, seed=2)
    lengths = [int(n) for n in np.random.default_rng(3).integers(3, 20, 16)]
    sched = Scheduler(PlainStepper(model, slots=8), max_waiting=16).start()   # more requests than slots: some wait
    try:
        alone = [collect(sched, Request(p, n)) for p, n in zip(ps, lengths)]
        results = [None] * 16

        def client(i):
            results[i] = collect(sched, Request(ps[i], lengths[i]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert results == alone
        assert all(f == FINISH_LENGTH and len(t) == n for (t, f), n in zip(alone, lengths))
    finally:
        sched.stop()


def feeding_stepper(model, slots, pipelined):
    """The plain step with the GPU stepper's habits: short prompts fed one token per step and, when
    pipelined, up to three steps in flight before the oldest is read (their inputs the argmax it fed itself)."""
    st = PlainStepper(model, slots)
    st.feed_max, st.pipelined, st.depth = 6, pipelined, 3 if pipelined else 1
    return st


def test_look_ahead_and_fed_prompts_change_no_answer(model):
    ps = prompts(12, seed=4)                  # 1 to 11 tokens: some fed, some prefilled
    lengths = [int(n) for n in np.random.default_rng(5).integers(1, 25, 12)]
    sched = Scheduler(feeding_stepper(model, 12, pipelined=False)).start()
    try:
        free = [collect(sched, Request(p, n))[0] for p, n in zip(ps, lengths)]
        stops = [{t[len(t) // 2]} if i % 3 == 0 and len(t) > 2 else set() for i, t in enumerate(free)]
        alone = [collect(sched, Request(p, n, stop_ids=st)) for p, n, st in zip(ps, lengths, stops)]
    finally:
        sched.stop()
    sched = Scheduler(feeding_stepper(model, 5, pipelined=True), max_waiting=12).start()
    try:
        results = [None] * 12
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, collect(sched, Request(ps[i], lengths[i], stop_ids=stops[i])))) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert results == alone
        assert sched.peak == 5
    finally:
        sched.stop()
    assert any(f == FINISH_STOP for _, f in alone) and any(f == FINISH_LENGTH for _, f in alone)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    sched = Scheduler(PlainStepper(model, slots=4)).start()
    try:
        sampling = Sampling(temperature=0.9, top_p=0.95, seed=7)
        alone = collect(sched, Request([1, 2, 3], 12, sampling))
        out = {}
        threads = [threading.Thread(target=lambda: out.setdefault("a", collect(sched, Request([1, 2, 3], 12, sampling))))]
        threads += [threading.Thread(target=collect, args=(sched, Request(p, 12, Sampling(1.0, 1.0, i))))
                    for i, p in enumerate(prompts(3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert out["a"] == alone
        assert collect(sched, Request([1, 2, 3], 12, Sampling(0.9, 0.95, 8))) != alone
    finally:
        sched.stop()


def test_a_stop_token_ends_the_answer_without_it(model):
    sched = Scheduler(PlainStepper(model, slots=2)).start()
    try:
        free, _ = collect(sched, Request([4, 5, 6], 10))
        stop = free[3]
        tokens, finish = collect(sched, Request([4, 5, 6], 10, stop_ids={stop}))
        assert finish == FINISH_STOP and tokens == free[:free.index(stop)]
    finally:
        sched.stop()


def test_a_cancelled_request_frees_its_slot_and_the_other_is_unharmed(model):
    sched = Scheduler(PlainStepper(model, slots=2), max_waiting=0).start()
    try:
        expected = collect(sched, Request([9, 8, 7], 30))
        gate, started, events = threading.Event(), threading.Event(), queue.Queue()

        def held(token, finish):               # the engine waits here on the victim's first token
            events.put((token, finish))
            started.set()
            gate.wait(TIMEOUT)

        victim = Request([1, 1, 1], 60, on_event=held)
        sched.submit(victim)
        assert started.wait(TIMEOUT)
        other = {}
        sched.submit(Request([9, 8, 7], 30, on_event=lambda t, f: other.setdefault("done", f) if f else
                             other.setdefault("tokens", []).append(t)))
        with pytest.raises(Busy):              # one slot decoding, one request waiting, no queue
            sched.submit(Request([2], 5))
        sched.cancel(victim)
        gate.set()
        while True:
            token, finish = events.get(timeout=TIMEOUT)
            if token is None:
                break
        assert finish == FINISH_CANCELLED and len(victim.tokens) < 60
        deadline = time.time() + TIMEOUT
        while "done" not in other and time.time() < deadline:
            time.sleep(0.01)
        assert (other["tokens"], other["done"]) == expected
        assert collect(sched, Request([2], 5))[1] == FINISH_LENGTH      # the slot is free again
        assert sched.load() == (0, 0)
    finally:
        sched.stop()


def test_requests_beyond_the_context_are_refused(model):
    sched = Scheduler(PlainStepper(model, slots=1))
    with pytest.raises(LlamacError, match="exceeds the context"):
        sched.submit(Request([1] * 60, 5))
    with pytest.raises(LlamacError, match="empty prompt"):
        Request([], 5)


def test_stop_cancels_what_is_decoding_and_waiting(model):
    sched = Scheduler(PlainStepper(model, slots=1), max_waiting=4).start()
    gate, started = threading.Event(), threading.Event()

    def held(token, finish):
        started.set()
        gate.wait(TIMEOUT)

    reqs = [Request([3, 4], 50, on_event=held)] + [Request([3, 4], 50) for _ in range(2)]
    for r in reqs:
        sched.submit(r)
    assert started.wait(TIMEOUT)
    sched.stop(timeout=0)                 # asks the engine to stop; it is still held in the first token
    gate.set()
    sched.stop()
    assert [r.finish_reason for r in reqs] == [FINISH_CANCELLED] * 3
    with pytest.raises(Busy):
        sched.submit(Request([3], 2))


class CharTokenizer:
    """Token i is the character chr(97 + i): enough to test the text logic."""

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


def stream(tokens, stop):
    ts = TextStream(CharTokenizer(), [0, 1], stop)
    parts, stopped = [], False
    for t in tokens:
        out, stopped = ts.push(t)
        parts.append(out)
        if stopped:
            break
    parts.append(ts.finish())
    return parts, stopped, ts.text


def ids(text):
    return [ord(c) - 97 for c in text]


def test_text_stream_cuts_at_a_stop_sequence_across_tokens():
    parts, stopped, text = stream(ids("hello world"), ["lo w"])
    assert stopped and text == "hel" and "".join(parts) == "hel"


def test_text_stream_holds_back_a_possible_stop_and_releases_it_when_it_is_not_one():
    parts, stopped, text = stream(ids("abcabd"), ["abx"])
    assert not stopped and text == "abcabd"
    assert parts[:3] == ["", "", "abc"]          # "a", "ab" could start "abx"; "c" shows they don't
    parts, stopped, text = stream(ids("xxab"), ["abx"])
    assert text == "xxab" and parts[-1] == "ab"    # held to the end, then given back


def test_text_stream_matches_the_whole_decode():
    from llamac.data.tokenizer import Tokenizer
    from pathlib import Path
    tok = Tokenizer(Path(__file__).parent / "data" / "botchan_en_bpe_1000.model")
    prompt = tok.encode("It was a fine day", bos=True)
    completion = tok.encode(" and the cat sat on the mat, said Botchan.", bos=False)
    ts = TextStream(tok, prompt)
    shown = "".join(ts.push(t)[0] for t in completion) + ts.finish()
    assert shown == tok.decode(prompt + completion)[len(tok.decode(prompt)):]


def test_without_the_serve_extra_the_error_says_what_to_install(monkeypatch):
    import sys
    from llamac.serve import require_web_stack
    monkeypatch.setitem(sys.modules, "fastapi", None)        # an import of it now fails
    with pytest.raises(LlamacError, match=r"pip install 'llamac\[serve\]'"):
        require_web_stack()


def test_chunk_encoder_gives_the_bytes_of_the_whole_chunks_json():
    from llamac.serve.protocol import ChunkEncoder, chat_chunk, completion_chunk, sse
    texts = [" the", "", 'a "quoted"\nline\\', "é 漢字 🙂", "\x00\x1f\u2028", ChunkEncoder.MARK, '"' + ChunkEncoder.MARK + '"']
    for model in ("tiny", ChunkEncoder.MARK, 'we"ird'):
        for chat, build in ((False, lambda i, t: completion_chunk("cmpl-1", 7, model, i, t)),
                            (True, lambda i, t: chat_chunk("chatcmpl-1", 7, model, i, {"content": t}))):
            encoder = ChunkEncoder("chatcmpl-1" if chat else "cmpl-1", 7, model, chat, n=3)
            for i in range(3):
                for t in texts:
                    assert encoder.text(i, t) == sse(build(i, t))


def test_a_deep_pipeline_launches_no_step_past_max_tokens(model):
    sched = Scheduler(feeding_stepper(model, 4, pipelined=True)).start()
    try:
        prompt = [3, 1, 4]
        tokens, finish = collect(sched, Request(prompt, 9))
        assert finish == FINISH_LENGTH and len(tokens) == 9
        assert sched.steps == len(prompt) + 9 - 1        # the last prompt token's step gives the first new token
    finally:
        sched.stop()


def test_concurrent_answers_over_a_device_that_runs_behind_the_host():
    """The synthetic stepper's steps finish on their own clock (up to four in flight); each request's
    tokens are still its own chain of the stepper's token function, whoever else is decoding."""
    from llamac.bench.serve_host import SyntheticStepper
    stepper = SyntheticStepper(slots=4, max_len=64, vocab_size=97, step_s=2e-4)
    assert stepper.depth == 4

    def expected(prompt, n):
        out, t = [], prompt[-1]
        for _ in range(n):
            t = (t * 31 + 7) % 97
            out.append(t)
        return out

    ps = prompts(10, seed=6)
    lengths = [int(n) for n in np.random.default_rng(7).integers(1, 30, 10)]
    sched = Scheduler(stepper, max_waiting=10).start()
    try:
        results = [None] * 10
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, collect(sched, Request(ps[i], lengths[i]))))
                   for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert results == [(expected(p, n), FINISH_LENGTH) for p, n in zip(ps, lengths)]
        assert sched.peak == 4
    finally:
        sched.stop()
