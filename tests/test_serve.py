"""`llamac serve` over real HTTP on 127.0.0.1, driven by the official openai client: a tiny model trained
here, greedy (or seeded) answers, concurrent clients, bad requests, limits, keys and Ctrl-C."""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llamac.infer.chat import render                                            # noqa: E402
from llamac.serve.scheduler import Request, Scheduler                           # noqa: E402
from llamac.serve.server import ServerThread, build                             # noqa: E402
from llamac.serve.steppers import PlainStepper                                  # noqa: E402
from llamac.train.checkpoint import load_model                                  # noqa: E402
from tests.test_train import ROOT, debug_recipe                                 # noqa: E402

TIMEOUT = 60
NAME = "tiny"
SLOTS = 16
PROMPTS = ["The king", "Good morrow", "What say you", "My lord, the queen", "O Romeo", "Once more unto",
           "To be", "Now is the winter", "Friends, Romans", "All the world", "Fair is foul", "Is this a dagger",
           "If music be", "Shall I compare", "The quality of mercy", "Cry havoc"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, shard_dir):
    from llamac.train.loop import pretrain
    out = tmp_path_factory.mktemp("serve_run")
    recipe = debug_recipe(out, shard_dir, "train.max_steps=40", "train.eval_every=0", "train.ckpt_every=40",
                          "train.sample_tokens=0", "model.max_seq_len=128")
    pretrain(recipe, resume=False)
    return out / "run"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tokenizer, _ = load_model(checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    app, scheduler = build(model, tokenizer, NAME, max_batch=SLOTS, max_queue=8)
    srv = ServerThread(app).start()
    srv.scheduler = scheduler
    yield srv
    srv.stop()
    scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(loaded):
    """The answer a request gets alone, from an engine of the same shape outside the server: token ids."""
    model, tokenizer = loaded
    scheduler = Scheduler(PlainStepper(model, SLOTS)).start()

    def run(prompt_ids, max_tokens, stop_ids):
        done = queue.Queue()
        request = Request(prompt_ids, max_tokens, stop_ids=stop_ids, on_event=lambda t, f: f and done.put(f))
        scheduler.submit(request)
        return request.tokens, done.get(timeout=TIMEOUT)

    yield run
    scheduler.stop()


def chat_ids(tokenizer, messages):
    return tokenizer.encode(render(messages, add_generation_prompt=True, bos="")[0], bos=True, special=True)


def whole_text(tokenizer, prompt_ids, ids):
    return tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["slots"] == SLOTS


def test_completion_text_and_usage_are_the_tokenizers(client, loaded, reference):
    _, tok = loaded
    ids = tok.encode("The king", bos=True)
    expected, finish = reference(ids, 20, {tok.eos_id})
    r = client.completions.create(model=NAME, prompt="The king", max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and abs(r.created - time.time()) < 600
    assert r.choices[0].text == whole_text(tok, ids, expected)
    assert r.choices[0].finish_reason == ("length" if finish == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected))
    assert r.usage.total_tokens == len(ids) + len(expected)


def test_chat_streamed_equals_whole(client, loaded, reference):
    _, tok = loaded
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who is the king?"}]
    ids = chat_ids(tok, messages)
    end_ids = {tok.eos_id, tok.piece_to_id("<|end|>")}
    expected, _ = reference(ids, 24, end_ids)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == whole_text(tok, ids, expected)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), len(expected))
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_seeded_sampling_streamed_equals_whole(client):
    args = dict(model=NAME, prompt="Good morrow", max_tokens=30, temperature=0.9, top_p=0.9, seed=11)
    whole = client.completions.create(**args).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
    assert streamed == whole
    assert client.completions.create(**{**args, "seed": 12}).choices[0].text != whole


def test_stop_sequences_cut_the_answer(client):
    free = client.completions.create(model=NAME, prompt="What say you", max_tokens=40, temperature=0).choices[0].text
    stop = free[10:13]
    cut = free[:free.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=NAME, prompt="What say you", max_tokens=40, temperature=0,
                                                    stop=[stop, "@@@"], stream=True))
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            c = client.completions.create(model=NAME, prompt="What say you", max_tokens=40, temperature=0,
                                          stop=[stop, "@@@"]).choices[0]
            text, finish = c.text, c.finish_reason
        assert (text, finish) == (cut, "stop")


def test_n_choices(client):
    r = client.completions.create(model=NAME, prompt="O Romeo", max_tokens=8, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) == 1
    assert r.usage.completion_tokens % 3 == 0 and 0 < r.usage.completion_tokens <= 24


def stream_text(url, prompt, max_tokens):
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True))


def test_sixteen_concurrent_clients_get_their_lone_answers_and_a_dropped_one_harms_none(server, client, loaded):
    lengths = [12 + 3 * (i % 5) for i in range(16)]
    alone = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], max_tokens=n,
                                            temperature=0).choices[0].message.content
             for p, n in zip(PROMPTS, lengths)]
    results = [None] * 16
    dropped = threading.Event()
    cancelled_before = server.scheduler.finished["cancelled"]

    def dropper():
        body = {"model": NAME, "prompt": "Now is the winter", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break                       # hang up mid-stream
        dropped.set()

    def worker(i):
        results[i] = stream_text(server.url, PROMPTS[i], lengths[i])

    # the engine is held inside one request's first token until all 17 requests wait: they then decode together
    gate, held = threading.Event(), threading.Event()
    server.scheduler.submit(Request(loaded[1].encode("x"), 2, on_event=lambda t, f: held.set() or gate.wait(TIMEOUT)))
    assert held.wait(TIMEOUT)
    threads = [threading.Thread(target=dropper)] + [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.time() + TIMEOUT
    while server.scheduler.load()[1] < 17 and time.time() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(TIMEOUT)
    assert dropped.is_set()
    assert results == alone
    assert server.scheduler.peak == SLOTS          # the requests shared decode steps
    deadline = time.time() + TIMEOUT
    while httpx.get(server.url + "/health", timeout=TIMEOUT).json()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["active"] == 0
    assert server.scheduler.finished["cancelled"] == cancelled_before + 1    # the hang-up ended its request


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_request(server, loaded):
    gate, held = threading.Event(), threading.Event()
    server.scheduler.submit(Request(loaded[1].encode("x"), 2, on_event=lambda t, f: held.set() or gate.wait(TIMEOUT)))
    assert held.wait(TIMEOUT)
    before = server.scheduler.finished["cancelled"]
    body = {"model": NAME, "prompt": "The king", "max_tokens": 50, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):          # the engine is held: no answer comes in time
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.time() + TIMEOUT
    waiting = list(server.scheduler._waiting)
    while not all(r.cancelled for r in waiting) and time.time() < deadline:
        time.sleep(0.05)                                 # the server notices the hang-up while it waits
    gate.set()
    while server.scheduler.load() != (0, 0) and time.time() < deadline:
        time.sleep(0.05)
    assert len(waiting) == 1 and server.scheduler.finished["cancelled"] == before + 1


CHAT = "/v1/chat/completions"
COMPLETE = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [  # path, body (bytes or JSON), status, param, code
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "invalid_type"),
    (CHAT, {"messages": USER}, 400, "model", "missing_required_parameter"),
    (CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    (CHAT, {"model": NAME}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"model": NAME, "messages": "hi"}, 400, "messages", "invalid_type"),
    (CHAT, {"model": NAME, "messages": []}, 400, "messages", "invalid_type"),
    (CHAT, {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    (CHAT, {"model": NAME, "messages": USER, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    (CHAT, {"model": NAME, "messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "max_tokens": 10**6}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "max_completion_tokens": 120}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    (CHAT, {"model": NAME, "messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    (CHAT, {"model": NAME, "messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    (CHAT, {"model": NAME, "messages": USER, "stop": 5}, 400, "stop", "invalid_type"),
    (CHAT, {"model": NAME, "messages": USER, "stop": list("abcde")}, 400, "stop", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "n": 99}, 400, "n", "invalid_value"),
    (CHAT, {"model": NAME, "messages": USER, "seed": 1.5}, 400, "seed", "invalid_type"),
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages",
     "context_length_exceeded"),
    (COMPLETE, {"model": NAME}, 400, "prompt", "missing_required_parameter"),
    (COMPLETE, {"model": NAME, "prompt": 7}, 400, "prompt", "invalid_type"),
    (COMPLETE, {"model": NAME, "prompt": [1, 10**6]}, 400, "prompt", "invalid_value"),
    (COMPLETE, {"model": NAME, "prompt": ""}, 400, "prompt", "invalid_value"),
    (COMPLETE, {"model": NAME, "prompt": "The king " * 100}, 400, "prompt", "context_length_exceeded"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=[f"{b[3]}-{b[4]}" for b in BAD])
def test_bad_request_gets_its_4xx_and_error_object(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


def test_unknown_paths_methods_and_big_bodies_get_error_objects(server):
    assert httpx.get(server.url + "/v1/nothing", timeout=TIMEOUT).json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + CHAT, timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(server.url + CHAT, content=b" " * (2 << 20), timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_the_openai_client_sees_the_api_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "x"}])
    assert info.value.body["param"] == "messages[0].role"


@pytest.fixture(scope="module")
def small_server(loaded):
    """One slot, no queue, an API key."""
    model, tokenizer = loaded
    app, scheduler = build(model, tokenizer, NAME, max_batch=1, max_queue=0, api_key="sesame")
    srv = ServerThread(app).start()
    yield srv, scheduler
    srv.stop()
    scheduler.stop()


def test_api_key_is_required(small_server):
    url = small_server[0].url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0, timeout=TIMEOUT)
    assert good.completions.create(model=NAME, prompt="The king", max_tokens=3, temperature=0).usage.completion_tokens <= 3


def test_a_full_server_answers_429_and_recovers(small_server, loaded):
    srv, scheduler = small_server
    url, auth = srv.url, {"Authorization": "Bearer sesame"}
    _, tok = loaded
    hold, held = threading.Event(), threading.Event()

    def slow_client(token, finish):            # holds the engine inside a step: the one slot stays taken
        held.set()
        hold.wait(TIMEOUT)

    scheduler.submit(Request(tok.encode("The king"), 3, on_event=slow_client))
    assert held.wait(TIMEOUT)
    body = {"model": NAME, "prompt": "The king", "max_tokens": 2, "temperature": 0}
    busy = httpx.post(url + COMPLETE, json=body, headers=auth, timeout=TIMEOUT)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    hold.set()
    deadline = time.time() + TIMEOUT
    while scheduler.load() != (0, 0) and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.post(url + COMPLETE, json=body, headers=auth, timeout=TIMEOUT).status_code == 200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_exits_cleanly_on_ctrl_c(checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llamac", "serve", "-c", str(checkpoint), "--port", str(port),
                             "--device", "cpu", "--model-name", NAME], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        got = {}

        def streaming():
            try:
                got["text"] = stream_text(url, "The king", 100)
            except Exception as exc:          # cut off by the shutdown: allowed, a clean end is too
                got["error"] = exc

        t = threading.Thread(target=streaming)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        t.join(TIMEOUT)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "serving 'tiny'" in out
        assert got
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_serve_bad_options_are_one_line_errors(tmp_path, checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, message in ((["-c", str(tmp_path / "missing")], "error:"),
                          (["-c", str(checkpoint), "--max-batch", "0"], "--max-batch must be")):
        r = subprocess.run([sys.executable, "-m", "llamac", "serve", *args], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=TIMEOUT)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_serve_bench_clients_count_every_token(loaded):
    """The bench's HTTP client and figures, on the CPU: one chunk per token, the usage agrees."""
    import math
    from llamac.bench.serve import IdTokenizer, drive, summarise
    from llamac.serve.server import build_for
    model, _ = loaded
    app, scheduler = build_for(PlainStepper(model, 4), IdTokenizer(model.config.vocab_size), "bench")
    srv = ServerThread(app).start()
    try:
        bodies = [{"model": "bench", "prompt": [1, 2 + i, 3], "max_tokens": 5 + i, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}} for i in range(3)]
        results = drive(srv.host, srv.port, bodies, timeout=TIMEOUT)
    finally:
        srv.stop()
        scheduler.stop()
    assert [len(arrivals) for _, arrivals, _ in results] == [5, 6, 7]
    figures = summarise(results)
    assert figures["tokens"] == figures["usage_tokens"] == 18
    assert all(math.isfinite(v) for v in figures.values())


def test_the_serve_bench_host_rows_on_the_synthetic_stepper():
    """`bench --what serve`'s host rows: the pretend device, the scheduler alone, the clients' figures."""
    import math
    from llamac.bench.serve_host import bench_serve_host
    rows = bench_serve_host({"test": 0.2}, clients=(1, 3), n_new=12, reps=1)
    assert [r["impl"] for r in rows] == ["pretend device", "scheduler, no HTTP", "llamac serve", "llamac serve"]
    assert rows[0]["tokens_per_s"] == 5000.0
    served = rows[2:]
    assert [r["tokens"] for r in served] == [12, 36] and [r["usage_tokens"] for r in served] == [12, 36]
    assert all(math.isfinite(r[k]) for r in served for k in ("tokens_per_s", "ttft_ms_p50", "itl_ms_p99",
                                                                "device_idle_us_per_token"))
    assert math.isfinite(served[0]["host_us_per_token"]) and served[0]["vs_alone"] > 0


def test_a_hugging_face_folder_serves_the_same_answers(tmp_path, checkpoint, client):
    from llamac.formats.export import export
    folder = export(checkpoint, format="hf", out=tmp_path / "hf")
    model, tokenizer, _ = load_model(folder)
    app, scheduler = build(model, tokenizer, NAME, max_batch=SLOTS)
    srv = ServerThread(app).start()
    try:
        hf = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        args = dict(model=NAME, messages=[{"role": "user", "content": "Who is the king?"}], max_tokens=16,
                    temperature=0)
        assert hf.chat.completions.create(**args).choices[0].message.content == \
            client.chat.completions.create(**args).choices[0].message.content
    finally:
        srv.stop()
        scheduler.stop()
