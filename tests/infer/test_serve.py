"""`hybrid-gpt serve` as a client sees it: the official openai client (and raw httpx for what it would never send)
against a real server on a free loopback port, over tiny random checkpoints."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import SERVE_CONTEXT as CONTEXT
from helpers import run_bad, slowed

from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.data.template import render
from hybrid_gpt.infer import api
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.infer.serve import Service, load_models, model_labels

DELAY = 0.02  # seconds per forward pass of the "slow" model: a stream long enough to leave mid-way


@pytest.fixture(scope="module")
def ckpts(serve_ckpts):
    return serve_ckpts


@pytest.fixture(scope="module")
def service(ckpts):
    """The server over standard, hybrid and "hybrid-2" (hybrid again, each forward slowed by DELAY)."""
    models = load_models([ckpts["standard"], ckpts["hybrid"], ckpts["hybrid"]])
    slowed(models[2].model, DELAY)
    svc = Service(models, port=0, log_level="warning").start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(ckpt, messages, max_tokens, seed, temperature=1.0):
    """The reply the engine itself gives: (text, tokens), up to the template's stop tokens."""
    model, tok, _ = load_checkpoint(ckpt)
    ids = render(tok, messages, add_generation_prompt=True).ids
    out = []
    for nxt in generate(model, torch.tensor([ids]), max_tokens, temperature=temperature, seed=seed,
                        stop_tokens=tok.stop_ids):
        if int(nxt[0, 0]) in tok.stop_ids:
            break
        out.append(int(nxt[0, 0]))
    return tok.decode(out), len(out), len(ids)


MESSAGES = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]


def test_models_are_named_by_their_directories(client):
    assert [m.id for m in client.models.list().data] == ["standard", "hybrid", "hybrid-2"]
    card = client.models.retrieve("hybrid")
    assert card.id == "hybrid" and card.model_extra["layers"] == "AAMM" and card.model_extra["context_length"] == 128
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


def test_labels_disambiguate_duplicates(tmp_path, ckpts):
    import shutil

    for d in ("a", "b"):
        shutil.copytree(ckpts["hybrid"], tmp_path / d / "pretrain-hybrid")
    a, b = tmp_path / "a" / "pretrain-hybrid", tmp_path / "b" / "pretrain-hybrid"
    assert model_labels([a, b, a, ckpts["standard"]]) == ["a/pretrain-hybrid", "b/pretrain-hybrid",
                                                          "a/pretrain-hybrid-2", "standard"]
    assert model_labels([a / "model.safetensors"]) == ["pretrain-hybrid"]


def test_a_chat_completion_is_the_engines_reply_with_exact_usage(client, ckpts):
    r = client.chat.completions.create(model="hybrid", messages=MESSAGES, max_tokens=12, seed=3)
    text, tokens, prompt = _reference(ckpts["hybrid"], MESSAGES, 12, seed=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "hybrid" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if tokens == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, tokens, prompt + tokens)


def test_same_seed_same_output_and_another_seed_another(client):
    def ask(seed, model="standard"):
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, seed=seed,
                                              temperature=1.0, top_p=0.95).choices[0].message.content

    assert ask(7) == ask(7) and ask(7) != ask(8)
    greedy = [client.chat.completions.create(model="standard", messages=MESSAGES, max_tokens=8, temperature=0)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_a_stream_sends_openai_chunks_and_ends_with_done(client, service):
    whole = client.chat.completions.create(model="standard", messages=MESSAGES, max_tokens=20, seed=5)
    stream = client.chat.completions.create(model="standard", messages=MESSAGES, max_tokens=20, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    body = {"model": "standard", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    raw = httpx.post(service.url + "/v1/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])  # only when asked for


def test_completions_stream_and_stop_strings(client):
    plain = client.completions.create(model="hybrid", prompt="ROMEO:", max_tokens=24, seed=11, temperature=0.9)
    text = plain.choices[0].text
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 24 and len(text) > 4
    streamed = client.completions.create(model="hybrid", prompt="ROMEO:", max_tokens=24, seed=11, temperature=0.9,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    stop = text[3:5]
    cut = client.completions.create(model="hybrid", prompt="ROMEO:", max_tokens=24, seed=11, temperature=0.9,
                                    stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= plain.usage.completion_tokens
    chat_cut = client.chat.completions.create(model="hybrid", messages=MESSAGES, max_tokens=24, seed=11,
                                              stop=stop, stream=True)
    assert stop not in "".join(c.choices[0].delta.content or "" for c in chat_cut)


def _timed_stream(client, model, seed, out, key):
    """Stream a reply; out[key] = (text, arrival time of each content chunk)."""
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=15, seed=seed, stream=True)
    text, times = "", []
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
            times.append(time.monotonic())
    out[key] = (text, times)


def test_concurrent_streams_all_advance_and_give_their_own_replies(client):
    """Two streams of one (slowed) model are stepped in turn, and a third of another model runs beside them: each
    reply is what it is alone."""
    out: dict = {}
    jobs = [("hybrid-2", 1, "a"), ("hybrid-2", 2, "b"), ("standard", 3, "c")]
    threads = [threading.Thread(target=_timed_stream, args=(client, m, s, out, k)) for m, s, k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(out) == {"a", "b", "c"}
    for model, seed, key in jobs:
        alone = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=15, seed=seed)
        assert out[key][0] == alone.choices[0].message.content
    (_, ta), (_, tb) = out["a"], out["b"]
    assert len(ta) > 3 and len(tb) > 3
    assert tb[0] < ta[-1] and ta[0] < tb[-1]  # interleaved, not one after the other


def _wait_finished(worker, pred, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in worker.finished if pred(r)]
        if done and worker.busy() == 0:
            return done[-1]
        time.sleep(0.05)
    raise AssertionError(f"no finished generation: {list(worker.finished)[-3:]}")


def test_a_client_that_leaves_mid_stream_stops_its_generation(client, service):
    worker = service.models[2].worker
    stream = client.chat.completions.create(model="hybrid-2", messages=MESSAGES, max_tokens=100, seed=4, stream=True,
                                            temperature=0.5)
    seen = 0
    rid = None
    for chunk in stream:
        rid = chunk.id
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    stream.close()
    record = _wait_finished(worker, lambda r: r["id"] == rid)
    # Tokens after the disconnect: those generated ahead of the reader (the window) and the one in flight.
    assert record["finish"] == "cancelled" and 3 <= record["tokens"] <= 3 + api.WINDOW + 4, record
    # a request that does not stream is stopped too when its client gives up waiting
    with pytest.raises(httpx.TimeoutException):
        httpx.post(service.url + "/v1/chat/completions", timeout=0.4,
                   json={"model": "hybrid-2", "messages": MESSAGES, "max_tokens": 100})
    record = _wait_finished(worker, lambda r: r["finish"] == "cancelled" and r["id"] != rid)
    assert record["tokens"] < 0.4 / DELAY + 10, record


BAD = [  # (body: bytes or a JSON value, status, code or param it names)
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b'{"model": "hybrid", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "invalid_json"),
    (b"[" * 50_000, 400, "invalid_json"),
    (b" " * (api.MAX_BODY_BYTES + 10), 413, "request_too_large"),
    ({"model": "hybrid", "messages": []}, 400, "messages"),
    ({"model": "hybrid", "messages": "hello"}, 400, "messages"),
    ({"model": "hybrid", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"model": "hybrid", "messages": [{"role": "user", "content": ["x"]}]}, 400, "messages.[0].content"),
    ({"model": "hybrid", "messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "messages"),
    ({"model": "hybrid", "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ({"model": "hybrid", "messages": MESSAGES, "temperature": "warm"}, 400, "temperature"),
    ({"model": "hybrid", "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"model": "hybrid", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "hybrid", "messages": MESSAGES, "max_tokens": 500}, 400, "context_length_exceeded"),
    ({"model": "hybrid", "messages": [{"role": "user", "content": "to be or not " * 200}]}, 400,
     "context_length_exceeded"),
    ({"model": "hybrid", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "hybrid", "messages": MESSAGES, "seed": "42"}, 400, "seed"),
    ({"model": "hybrid", "messages": MESSAGES, "stream": 1}, 400, "stream"),
    ({"model": "hybrid", "messages": MESSAGES, "temprature": 0.5}, 400, "unknown_parameter"),
    ({"model": "hybrid", "messages": MESSAGES, "n": 3}, 400, "n"),
    ({"messages": MESSAGES}, 400, "model"),
    ({"model": "gpt-4", "messages": MESSAGES}, 404, "model_not_found"),
    ({"model": "hybrid", "prompt": "x"}, 400, "unknown_parameter"),
]


@pytest.mark.parametrize("body, status, named", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_malformed_request_gets_a_4xx_in_openais_error_shape(service, body, status, named):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(service.url + "/v1/chat/completions", content=content, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert named in (error["code"], error["param"]), error


def test_other_malformed_requests_and_the_server_lives_on(service, client):
    url = service.url
    cases = [httpx.get(url + "/v1/chat/completions"), httpx.get(url + "/v2/nothing"),
             httpx.post(url + "/v1/completions", json={"model": "hybrid", "prompt": 5}),
             httpx.post(url + "/v1/completions", json={"model": "hybrid", "prompt": ["a", "b"]}),
             httpx.post(url + "/v1/completions", content=b'{"model": "hybrid", "prompt": "\\ud800"}'),
             httpx.post(url + "/v1/chat/completions", content=b'{"model": "hybrid", "messages": [{"role": "user", '
                                                              b'"content": "\\udfff"}]}')]
    assert [r.status_code for r in cases] == [405, 404, 400, 400, 400, 400]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in cases)
    # a body announced far too large is refused from its headers, before a byte of it is read
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{")
        answer = b""
        while b"request_too_large" not in answer and (part := s.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in answer
    with pytest.raises(openai.BadRequestError) as e:  # the client sees OpenAI's error too
        client.chat.completions.create(model="hybrid", messages=MESSAGES, temperature=9)
    assert e.value.body["param"] == "temperature"
    assert client.chat.completions.create(model="hybrid", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2


def test_a_default_reply_stays_within_the_context(client):
    r = client.chat.completions.create(model="standard", messages=MESSAGES, temperature=0.7, seed=1)
    assert r.usage.total_tokens <= CONTEXT


def test_the_command_serves_until_interrupted(ckpts):
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_gpt", "serve", str(ckpts["standard"]),
                             str(ckpts["hybrid"]), "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("serving" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = re.search(r"API at (http://127\.0\.0\.1:\d+)/v1 ", lines[-1]).group(1)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["standard", "hybrid"]
        page = httpx.get(url + "/")
        assert page.headers["content-type"].startswith("text/html") and "connect-src 'self'" in page.headers[
            "content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


def test_command_errors_are_one_line(ckpts, tmp_path, capsys, monkeypatch):
    code, err = run_bad(["serve", tmp_path / "missing"], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code, err = run_bad(["serve", ckpts["standard"], "--port", taken.getsockname()[1]], capsys)
    finally:
        taken.close()
    assert code == 2 and "cannot listen on 127.0.0.1:" in err and len(err.strip().splitlines()) == 1
    code, err = run_bad(["serve", ckpts["standard"], "--host", "no-such-host.invalid"], capsys)  # never looked up
    assert code == 2 and "argument --host: must be an IP address" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, err = run_bad(["serve", ckpts["standard"]], capsys)
    assert code == 2 and "'serve' extra" in err and "uvicorn" in err and len(err.strip().splitlines()) == 1
