"""The OpenAI-compatible server: its answers equal the engine's, streaming equals non-streaming, concurrent
requests are batched and each gets the text it gets alone, bad requests get clear 4xx errors (and the server
goes on), clients that hang up are cancelled, shutdown drains or cancels and joins."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lmpress.runtime import Engine, SamplingParams
from lmpress.runtime.server import Server

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Once upon a time", "Lily", "The dog was very", "Tom and Sue went to the park and"]
MAX_LEN, LIMIT, BODY = 96, 48, 4096


@pytest.fixture(scope="module")
def srv(stories):
    s = Server(stories, port=0, max_batch=4, max_len=MAX_LEN, max_tokens_limit=LIMIT, max_request_bytes=BODY,
               model_name="stories").start()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def engine(stories):
    return Engine(stories, max_len=MAX_LEN)


def request(srv, method, path, body=None, raw: bytes | None = None, headers=None):
    """(status, headers, parsed JSON or the text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, r.headers, json.loads(text)
    except ValueError:
        return r.status, r.headers, text


def post(srv, path, body):
    status, _, out = request(srv, "POST", path, body)
    assert status == 200, out
    return out


def sse(text: str) -> list:
    """The `data:` payloads of an event stream, JSON-decoded ([DONE] kept as the string)."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    chunks = [c[len("data: "):] for c in text.split("\n\n") if c]
    return [c if c == "[DONE]" else json.loads(c) for c in chunks]


def greedy(n, **kw):
    return {"max_tokens": n, "temperature": 0, **kw}


def test_completion_equals_engine_generate(srv, engine):
    want = engine.generate(PROMPTS[0], SamplingParams(max_tokens=20))
    out = post(srv, "/v1/completions", {"prompt": PROMPTS[0], "model": "anything", **greedy(20)})
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "stories"
    assert abs(out["created"] - time.time()) < 60
    (choice,) = out["choices"]
    assert choice["text"] == want.text and choice["finish_reason"] == want.finish_reason == "length"
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": len(want.prompt_ids), "completion_tokens": 20,
                            "total_tokens": len(want.prompt_ids) + 20}
    by_ids = post(srv, "/v1/completions", {"prompt": want.prompt_ids, **greedy(20)})
    assert by_ids["choices"][0]["text"] == want.text
    stop = post(srv, "/v1/completions", {"prompt": PROMPTS[0], "stop": ["Lily", "zzz"], **greedy(20)})
    assert stop["choices"][0] == {**choice, "text": want.text[:want.text.index("Lily")], "finish_reason": "stop"}
    sampled = [post(srv, "/v1/completions", {"prompt": "Once", "max_tokens": 12, "temperature": 0.9,
                                              "top_p": 0.9, "top_k": 40, "seed": 7})["choices"][0]["text"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_equals_non_streaming(srv, path):
    chat = path.endswith("chat/completions")
    body = {"messages": [{"role": "user", "content": "Tell me a story"}]} if chat else {"prompt": PROMPTS[3]}
    body.update(greedy(30))
    full = post(srv, path, body)
    status, headers, text = request(srv, "POST", path, {**body, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = sse(text)
    *events, usage, done = chunks
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"] == full["usage"]
    assert all(e["id"] == events[0]["id"] and e["object"] == ("chat.completion.chunk" if chat else "text_completion")
               for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == full["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert streamed == full["choices"][0]["message"]["content"]
    else:
        assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]
    assert len(events) > 5  # pieces, not one lump


def test_chat_completion(srv, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = post(srv, "/v1/chat/completions", {"messages": messages, **greedy(16)})
    want = engine.generate(engine.chat_ids(messages), SamplingParams(max_tokens=16))
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    assert out["usage"]["prompt_tokens"] == len(want.prompt_ids)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    assert post(srv, "/v1/chat/completions", {"messages": parts, **greedy(16)})["choices"] == out["choices"]
    # no max_tokens: up to the server's limit (or the context)
    assert post(srv, "/v1/chat/completions", {"messages": messages, "temperature": 0})["usage"]["completion_tokens"] \
        <= LIMIT


def test_concurrent_requests_are_batched(srv, monkeypatch):
    bodies = [{"prompt": p, "ignore_eos": True, **greedy(n)} for p, n in zip(PROMPTS, (9, 25, 5, 17))]
    alone = [post(srv, "/v1/completions", b)["choices"][0]["text"] for b in bodies]

    gate = threading.Event()  # hold the worker until all four requests are queued: then they must share steps
    step = srv.scheduler.step
    monkeypatch.setattr(srv.scheduler, "step", lambda: (gate.wait(30), step())[1])
    srv.peak_active = 0
    got: dict[int, str] = {}

    def client(i):
        got[i] = post(srv, "/v1/completions", bodies[i])["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while request(srv, "GET", "/health")[2]["waiting"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = request(srv, "GET", "/health")[2]
    assert health["waiting"] == 4 and health["active"] == 0
    gate.set()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(4)] == alone
    assert srv.peak_active == 4  # all four decoded in the same steps


def test_client_disconnect_cancels(srv, monkeypatch):
    finished = []
    step = srv.scheduler.step

    def slow_step():  # ~20 ms a token: the client hangs up long before 48 tokens
        time.sleep(0.02)
        events = step()
        finished.extend(ev.completion.finish_reason for ev in events if ev.finished)
        return events

    monkeypatch.setattr(srv.scheduler, "step", slow_step)
    for stream in (True, False):
        sock = socket.create_connection((srv.host, srv.port))
        body = json.dumps({"prompt": "Once", "stream": stream, "ignore_eos": True, **greedy(LIMIT)}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.1)
        sock.close()
        deadline = time.monotonic() + 10
        while len(finished) < (1 if stream else 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finished[-1] == "cancelled"
    health = request(srv, "GET", "/health")[2]
    assert health["active"] == health["waiting"] == 0


@pytest.mark.parametrize("method,path,body,status,code", [
    ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": LIMIT + 1}, 400, "max_tokens_exceeded"),
    ("POST", "/v1/completions", {"prompt": list(range(3, 3 + MAX_LEN))}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/v1/completions", b"x" * (BODY + 1), 413, "request_too_large"),
    ("POST", "/v1/completions", {"prompt": "Once", "n": 2}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "Once", "echo": True}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, None),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400, None),
    ("POST", "/v1/completions", {"prompt": []}, 400, None),
    ("POST", "/v1/completions", {}, 400, None),
    ("POST", "/v1/completions", {"prompt": "Once", "temperature": "hot"}, 400, None),
    ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 0}, 400, None),
    ("POST", "/v1/completions", {"prompt": "Once", "stop": [1]}, 400, None),
    ("POST", "/v1/completions", {"prompt": "Once", "stream": "yes"}, 400, None),
    ("POST", "/v1/chat/completions", {"messages": "Hi"}, 400, None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, None),
    ("POST", "/v1/embeddings", {"input": "x"}, 404, "not_found"),
    ("GET", "/nowhere", None, 404, "not_found"),
    ("GET", "/v1/completions", None, 405, "method_not_allowed"),
    ("POST", "/health", {}, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed"),
])
def test_limits_and_bad_input(srv, method, path, body, status, code):
    raw = body if isinstance(body, bytes) else None
    got, headers, out = request(srv, method, path, None if raw else body, raw=raw)
    assert got == status, out
    err = out["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error") and err["code"] == code
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")
    assert post(srv, "/v1/completions", {"prompt": "Once", **greedy(3)})["choices"][0]["text"]  # still serving


def test_keep_alive_and_models(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    for path in ("/v1/models", "/v1/models/stories", "/health"):  # one connection, several requests
        conn.request("GET", path)
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 200
    conn.close()
    assert out["status"] == "ok" and out["model"] == "stories" and out["max_len"] == MAX_LEN
    models = request(srv, "GET", "/v1/models")[2]
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["stories"]


def test_a_failing_step_fails_its_requests_not_the_server(srv, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(srv.scheduler, "step", broken)
    status, _, out = request(srv, "POST", "/v1/completions", {"prompt": "Once", **greedy(4)})
    assert status == 500 and out["error"]["type"] == "server_error" and "boom" in out["error"]["message"]
    assert post(srv, "/v1/completions", {"prompt": "Once", **greedy(4)})["choices"][0]["text"]


def test_shutdown_drains_then_cancels_and_joins(stories, monkeypatch):
    for drain in (10.0, 0.0):
        s = Server(stories, port=0, max_batch=2, max_len=64).start()
        step = s.scheduler.step
        monkeypatch.setattr(s.scheduler, "step", lambda: (time.sleep(0.02), step())[1])
        result = {}
        body = {"prompt": "Once", "ignore_eos": True, "stream": drain == 0, **greedy(20)}
        t = threading.Thread(target=lambda: result.update(r=request(s, "POST", "/v1/completions", body)))
        t.start()
        deadline = time.monotonic() + 30
        while not s.health()["active"] and time.monotonic() < deadline:
            time.sleep(0.005)
        s.shutdown(drain_s=drain)
        t.join(30)
        assert not any(th.is_alive() for th in s._threads)
        status, _, out = result["r"]
        if drain:  # drained: the request finished
            assert status == 200 and out["usage"]["completion_tokens"] == 20
        else:  # cancelled: the stream ends with an error event, then [DONE]
            *_, err, done = sse(out)
            assert err["error"]["code"] == "cancelled" and done == "[DONE]"
        with pytest.raises(OSError):
            socket.create_connection((s.host, s.port), timeout=2)


def test_cli_serve_answers_then_exits_cleanly(stories_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lmpress.cli", "serve", str(stories_dir / "hf"), "--port", "0",
                          "--json", "--quiet", "--threads", "1", "--max-len", "64", "--model-name", "tiny"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        start = json.loads(p.stdout.readline())
        host, port = start["url"].rsplit("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["model"] == "tiny"
        conn.close()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert json.loads(out)["url"] == start["url"]
