"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (standard library only).

    srv = Server(lm, port=0, max_batch=4).start()   # lm: a LoadedModel (or an Engine); port 0: a free port
    srv.port, srv.url                               # where it listens
    srv.shutdown()                                  # stop accepting, drain or cancel, join the worker

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`:
server-sent events `data: {...}` then `data: [DONE]`). `lmpress serve` runs `serve()`: start, then block
until SIGINT/SIGTERM.

Threads: http.server runs one handler thread per connection; a handler validates the request, tokenizes it,
registers a queue and adds the request to the scheduler, then waits on that queue. One worker thread is the
only one that touches the model: it calls Scheduler.step() while there is work and hands each Event to the
queue of its request. A handler whose client goes away cancels its request (the row is freed at the next
step). Anything a request gets wrong is a 4xx with an OpenAI-style body {"error": {"message", "type",
"param", "code"}}; a failure inside a step fails the requests in flight with a 500 and the server goes on
with a fresh scheduler.
"""

from __future__ import annotations

import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import BadInput
from .engine import Engine, Event
from .sampling import SamplingParams

POLL_S = 0.05  # how often a waiting handler checks its client and the worker; the idle worker's sleep


class HTTPError(Exception):
    """A request's error, sent as {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class _Pending:
    """A request in the scheduler: its id there, that scheduler, and the queue its events arrive on."""

    rid: int
    sched: object  # the Scheduler it was added to (a failed step replaces the server's)
    events: queue.Queue  # Events, or an HTTPError when the step serving it failed


class Server:
    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 4,
                 max_len: int | None = None, max_tokens_limit: int = 1024, max_request_bytes: int = 1 << 20,
                 model_name: str | None = None, drain_s: float = 10.0, log=None):
        """model: a LoadedModel (an Engine with max_batch rows and a max_len cache is built) or an Engine.
        max_tokens_limit: the largest max_tokens a request may ask for (also the chat default);
        max_request_bytes: the largest request body; drain_s: how long shutdown waits for requests in flight
        before cancelling them; log: a file for one line per request (None: silent)."""
        if max_tokens_limit < 1 or max_request_bytes < 1:
            raise BadInput("max_tokens_limit and max_request_bytes must be positive")
        self.engine = model if isinstance(model, Engine) else Engine(model, max_batch=max_batch, max_len=max_len)
        self.model_name = model_name or self.engine.lm.name
        self.max_tokens_limit, self.max_request_bytes, self.drain_s, self.log = \
            max_tokens_limit, max_request_bytes, drain_s, log
        self.scheduler = self.engine.scheduler()
        self.created = int(time.time())
        self.peak_active = 0  # the most sequences one step has decoded together (shows batching happened)
        self.requests_served = 0
        self.tokenizer_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _pending (and the scheduler swap after a failed step)
        self._pending: dict[int, _Pending] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._hurry = threading.Event()  # shutdown: cancel at once instead of draining
        self._closing = False
        self._handlers = 0  # generation requests inside a handler
        self._handlers_idle = threading.Condition(self._lock)
        self._httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifetime

    def start(self) -> Server:
        """Start the worker and the accept loop in background threads; returns self."""
        self._threads = [threading.Thread(target=self._work, name="lmpress-worker", daemon=True),
                         threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                          name="lmpress-http", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def shutdown(self, drain_s: float | None = None) -> None:
        """Stop accepting connections; let requests in flight finish for up to drain_s seconds (default: the
        server's), cancel what remains, wait for their handlers to answer, then join the worker."""
        if self._closing:
            return
        self._closing = True
        if self._threads:
            self._httpd.shutdown()  # the accept loop ends; handler threads already running go on
        deadline = time.monotonic() + (self.drain_s if drain_s is None else drain_s)
        while self._in_flight() and time.monotonic() < deadline and not self._hurry.is_set():
            time.sleep(POLL_S)
        with self._lock:
            for p in self._pending.values():
                p.sched.cancel(p.rid)
        self._wake.set()
        with self._handlers_idle:  # cancelled requests answer at the worker's next step
            self._handlers_idle.wait_for(lambda: self._handlers == 0, timeout=30)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._httpd.server_close()

    def run_until_signal(self) -> None:
        """Block until SIGINT or SIGTERM (a second one skips the drain), then shut down. Main thread only."""
        got = threading.Event()

        def on_signal(signum, frame):
            if got.is_set():
                self._hurry.set()
            got.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not got.wait(0.5):
                pass
            self.shutdown()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _in_flight(self) -> bool:
        with self._lock:
            return bool(self._pending)

    # ---- the worker: the only thread that runs the model

    def _work(self) -> None:
        while True:
            sched = self.scheduler
            if not sched.has_work():
                if self._stop.is_set():
                    return
                if self._wake.wait(POLL_S):
                    self._wake.clear()
                continue
            try:
                events = sched.step()
            except Exception as e:  # noqa: BLE001 — a failed step must not take the server down
                self._fail_all(sched, e)
                continue
            self.peak_active = max(self.peak_active, sched.counts()["active"])
            with self._lock:
                for ev in events:
                    p = self._pending.get(ev.request_id)
                    if p is None:
                        continue
                    if ev.finished:
                        del self._pending[ev.request_id]
                    p.events.put(ev)

    def _fail_all(self, sched, err: Exception) -> None:
        """A step raised: its scheduler's state is unknown, so every request on it fails and a new one starts."""
        msg = f"generation failed: {type(err).__name__}: {err}"
        print(f"lmpress serve: {msg}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        with self._lock:
            for p in self._pending.values():
                p.events.put(HTTPError(500, msg, "server_error"))  # instead of the events that will not come
            self._pending.clear()
            if self.scheduler is sched:
                self.scheduler = self.engine.scheduler()

    # ---- what handler threads call

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> _Pending:
        if self._closing:
            raise HTTPError(503, "the server is shutting down", "server_error", "shutting_down")
        with self._lock:
            sched = self.scheduler
            try:
                rid = sched.add_request(prompt_ids, params)
            except BadInput as e:
                code = "context_length_exceeded" if "context limit" in str(e) else None
                raise HTTPError(400, str(e), code=code, param="prompt" if code else None) from None
            p = self._pending[rid] = _Pending(rid, sched, queue.Queue())
            self.requests_served += 1
        self._wake.set()
        return p

    def events(self, p: _Pending, client: socket.socket | None):
        """The request's events as they come; cancels it when the client hangs up (then ends quietly)."""
        checked = time.monotonic()
        while True:
            try:
                ev = p.events.get(timeout=POLL_S)
            except queue.Empty:
                ev = None
                if not self._threads[0].is_alive():
                    raise HTTPError(503, "the generation worker is not running", "server_error") from None
            if client is not None and time.monotonic() - checked >= POLL_S:  # even while tokens keep coming
                checked = time.monotonic()
                if _hung_up(client):
                    self.cancel(p)
                    client = None  # cancelled: the final event still comes, and ends the loop
            if ev is None:
                continue
            if isinstance(ev, HTTPError):
                raise ev
            yield ev
            if ev.finished:
                return

    def cancel(self, p: _Pending) -> None:
        p.sched.cancel(p.rid)
        self._wake.set()

    def health(self) -> dict:
        c = self.scheduler.counts()
        return {"status": "shutting_down" if self._closing else "ok", "model": self.model_name,
                "active": c["active"], "waiting": c["waiting"], "max_batch": c["max_batch"],
                "max_len": self.engine.max_len, "max_tokens_limit": self.max_tokens_limit,
                "peak_active": self.peak_active, "requests": self.requests_served,
                "engine": "native" if self.engine.native else "transformers"}


def serve(model, host: str = "127.0.0.1", port: int = 8000, **kw) -> Server:
    """Start a Server and block until SIGINT/SIGTERM; returns it, shut down."""
    srv = Server(model, host, port, **kw).start()
    srv.run_until_signal()
    return srv


def _hung_up(sock: socket.socket) -> bool:
    """True when the peer closed the connection (readable with nothing to read) or reset it."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# ---- requests: JSON in, SamplingParams and prompt ids out

def _get(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if present and not null, checked to be of `kinds` (bool is not an int here) and `check`."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds) or check and not check(v):
        raise HTTPError(400, f"'{name}' must be {what}, got {json.dumps(v)[:80]}", param=name)
    return v


_NUMBER = (int, float)
_DEFAULTS = {  # OpenAI fields this server does not implement: accepted only as null or the values listed
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,), "suffix": ("",),
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "response_format": ({"type": "text"},),
}


def sampling_params(body: dict, limit: int, default_max_tokens: int) -> SamplingParams:
    for name, allowed in _DEFAULTS.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise HTTPError(400, f"'{name}' is not supported by this server (only {json.dumps(allowed[0])})",
                            param=name, code="unsupported_parameter")
    max_tokens = _get(body, "max_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", int, default_max_tokens, lambda v: v >= 1, "an integer >= 1")
    if max_tokens > limit:
        raise HTTPError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens",
                        code="max_tokens_exceeded")
    stop = _get(body, "stop", (str, list), (), what="a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise HTTPError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    seed = _get(body, "seed", int, None, what="an integer")
    try:
        return SamplingParams(
            max_tokens=max_tokens, stop=tuple(stop), seed=seed,
            temperature=float(_get(body, "temperature", _NUMBER, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
            top_p=float(_get(body, "top_p", _NUMBER, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            top_k=_get(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
            repetition_penalty=float(_get(body, "repetition_penalty", _NUMBER, 1.0, lambda v: v > 0, "a number > 0")),
            ignore_eos=_get(body, "ignore_eos", bool, False, what="true or false"))
    except BadInput as e:
        raise HTTPError(400, str(e)) from None


def completion_prompt(body: dict, engine: Engine) -> list[int]:
    """`prompt`: a string, a list of token ids, or a list holding one of those (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise HTTPError(400, "one prompt per request: send several requests (they are batched together)",
                        param="prompt")
    raise HTTPError(400, "'prompt' must be a string or a list of token ids", param="prompt")


def chat_prompt(body: dict, engine: Engine) -> list[int]:
    """`messages` through the tokenizer's chat template (content: a string or a list of text parts)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HTTPError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                        param="messages")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}] must be {{\"role\": string, \"content\": string or text parts}}",
                            param="messages")
        out.append({"role": m["role"], "content": content})
    try:
        return engine.chat_ids(out)
    except Exception as e:  # noqa: BLE001 — a template that refuses the conversation (roles must alternate, ...)
        raise HTTPError(400, f"the chat template refused these messages: {e}", param="messages") from None


# ---- responses

class _Route:
    """One generation endpoint: how its prompt is built and what its responses look like."""

    def __init__(self, kind: str):
        self.chat = kind == "chat"
        self.prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

    def prompt(self, body: dict, engine: Engine) -> list[int]:
        return chat_prompt(body, engine) if self.chat else completion_prompt(body, engine)

    def choice(self, text: str | None, finish: str | None, first: bool = False, stream: bool = False) -> dict:
        if not self.chat:
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        if not stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _handler_class(server: Server):
    routes = {"/health": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lmpress"

        def log_message(self, fmt, *args):
            if server.log is not None:
                print(f"lmpress serve: {self.address_string()} {fmt % args}", file=server.log, flush=True)

        def _route(self, method: str):
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            self._consumed = self.headers.get("Content-Length", "0") == "0" and not self.headers.get(
                "Transfer-Encoding")  # an error before the body is read closes the connection
            try:
                want = routes.get(path) or ("GET" if path == f"/v1/models/{server.model_name}" else None)
                if want is None:
                    raise HTTPError(404, f"no route {path}; routes: {', '.join(routes)}", "not_found_error",
                                    "not_found")
                if method != want:
                    self._drain_body()
                    raise HTTPError(405, f"{path} takes {want}, not {method}", code="method_not_allowed",
                                    headers={"Allow": want})
                if path == "/health":
                    h = server.health()
                    return self._json(200 if h["status"] == "ok" else 503, h)
                if path.startswith("/v1/models"):
                    card = {"id": server.model_name, "object": "model", "created": server.created,
                            "owned_by": "lmpress"}
                    return self._json(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
                self._generate(_Route("chat" if path.endswith("chat/completions") else "completion"))
            except HTTPError as e:
                self._json(e.status, e.body(), e.headers)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as e:  # noqa: BLE001 — a bug answers 500; the server goes on
                traceback.print_exc(file=sys.stderr)
                self._json(500, HTTPError(500, f"{type(e).__name__}: {e}", "server_error").body())

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

        def do_PATCH(self):
            self._route("PATCH")

        def _json(self, status: int, obj: dict, headers: dict | None = None):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if status >= 400 and (not self._consumed or status >= 500):
                self.send_header("Connection", "close")  # the body is unread (413), or the server is in trouble
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _length(self) -> int:
            if self.headers.get("Transfer-Encoding"):
                raise HTTPError(411, "send the body with a Content-Length (chunked transfer is not supported)",
                                code="length_required")
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise HTTPError(400, "bad Content-Length header") from None
            if n < 0:
                raise HTTPError(400, "bad Content-Length header")
            if n > server.max_request_bytes:
                raise HTTPError(413, f"the request body has {n} bytes; this server takes at most "
                                     f"{server.max_request_bytes}", code="request_too_large")
            return n

        def _drain_body(self):
            try:
                n = self._length()
            except HTTPError:
                self.close_connection = True
                return
            self.rfile.read(n)
            self._consumed = True

        def _body(self) -> dict:
            raw = self.rfile.read(self._length())
            self._consumed = True
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "the body must be a JSON object", code="invalid_json")
            return body

        def _generate(self, route: _Route):
            body = self._body()
            stream = _get(body, "stream", bool, False, what="true or false")
            include_usage = stream and bool((_get(body, "stream_options", dict, {}, what="an object"))
                                            .get("include_usage"))
            default = server.max_tokens_limit if route.chat else min(16, server.max_tokens_limit)
            params = sampling_params(body, server.max_tokens_limit, default)
            with server.tokenizer_lock:  # handlers tokenize concurrently; a fast tokenizer's state is not shared
                ids = route.prompt(body, server.engine)
            with server._handlers_idle:
                server._handlers += 1
            try:
                p = server.submit(ids, params)
                meta = {"id": route.prefix + uuid.uuid4().hex[:24], "object": route.object,
                        "created": int(time.time()), "model": server.model_name}
                if stream:
                    self._stream(route, p, meta, include_usage)
                else:
                    c = next(ev for ev in server.events(p, self.connection) if ev.finished).completion
                    if c.finish_reason == "cancelled":
                        raise HTTPError(503, "the request was cancelled: the server is shutting down",
                                        "server_error", "cancelled")
                    self._json(200, {**meta, "choices": [route.choice(c.text, c.finish_reason)],
                                     "usage": _usage(len(c.prompt_ids), len(c.token_ids))})
            finally:
                with server._handlers_idle:
                    server._handlers -= 1
                    server._handlers_idle.notify_all()

        def _stream(self, route: _Route, p: _Pending, meta: dict, include_usage: bool):
            meta = {**meta, "object": route.chunk_object}
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the end of the body is the end of the stream
            self.end_headers()
            self.close_connection = True

            def send(obj) -> None:
                self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
                self.wfile.flush()

            try:
                first = route.chat
                if first:  # the role comes first, as OpenAI sends it
                    send({**meta, "choices": [route.choice("", None, first=True, stream=True)]})
                for ev in server.events(p, self.connection):
                    ev: Event
                    if ev.finished and ev.completion.finish_reason == "cancelled":
                        if server._closing:
                            send(HTTPError(503, "cancelled: the server is shutting down", "server_error",
                                           "cancelled").body())
                            send(b"[DONE]")
                        return
                    if ev.text or ev.finished:
                        finish = ev.completion.finish_reason if ev.finished else None
                        send({**meta, "choices": [route.choice(ev.text, finish, stream=True)]})
                    if ev.finished and include_usage:
                        c = ev.completion
                        send({**meta, "choices": [], "usage": _usage(len(c.prompt_ids), len(c.token_ids))})
                send(b"[DONE]")
            except (BrokenPipeError, ConnectionResetError):
                server.cancel(p)  # the client went away mid-stream
            except HTTPError as e:
                try:
                    send(e.body())
                    send(b"[DONE]")
                except OSError:
                    pass

    return Handler

