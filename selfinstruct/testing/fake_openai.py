"""A small OpenAI-compatible HTTP server that stands in for paid remote APIs in tests and benchmarks.

It speaks real HTTP on 127.0.0.1 (random port) from a background thread, so the `openai` SDK, its transport,
timeouts and connection pooling are exercised exactly as against a real provider. Each request is answered
by the next scripted `Reply` in the queue, else by the responder callback, else by a default text. Replies
can inject the faults a real provider produces: 429 with Retry-After, 5xx, slow answers, empty or truncated
bodies, `finish_reason="length"`, garbage, a 400 for `response_format`, a 404 for an unknown model.

A responder sees the request body, plus the `X-Selfinstruct-Stage` header (`TeacherRequest.marker`: the
template the request was rendered from) under the key `MARKER`, so a scripted teacher can answer by stage
without reading the prompt's wording.

One thread per connection (stdlib `ThreadingHTTPServer`): a fixed latency sleeps only its own connection, so
hundreds of concurrent requests are served in parallel.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from selfinstruct.teachers.base import MARKER_HEADER

MARKER = "x_selfinstruct_stage"
"""Key of the marker header in the request a responder is given."""


@dataclass
class Reply:
    """One scripted answer. The defaults give a normal 200 response; the classmethods build the faults."""

    text: str | list[str] | None = None
    """Content of every choice (a list gives one text per choice); None uses the responder/default text."""
    finish_reason: str = "stop"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    """Raw response body instead of a well-formed completion (empty, truncated or garbage bodies)."""
    delay: float = 0.0
    """Seconds to wait before answering (on top of the server's fixed latency)."""
    error: str = ""
    code: str | None = None

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0, *, ms: bool = False) -> Reply:
        header = (
            {"retry-after-ms": str(int(retry_after * 1000))} if ms else {"retry-after": f"{retry_after:g}"}
        )
        return cls(status=429, headers=header, error="Rate limit reached", code="rate_limit_exceeded")

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls(status=status, error="The server had an error while processing your request")

    @classmethod
    def slow(cls, seconds: float, text: str | None = None) -> Reply:
        return cls(text=text, delay=seconds)

    @classmethod
    def empty_body(cls) -> Reply:
        return cls(body=b"")

    @classmethod
    def truncated_body(cls) -> Reply:
        return cls(body=b'{"id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess')

    @classmethod
    def garbage_body(cls) -> Reply:
        return cls(body=b"<html><body>502 Bad Gateway</body></html>")

    @classmethod
    def length(cls, text: str = "1. Write a poem about the sea\n2. Sort the") -> Reply:
        return cls(text=text, finish_reason="length")

    @classmethod
    def garbage_text(cls, seed: int = 0) -> Reply:
        rng = random.Random(seed)
        return cls(text="".join(rng.choice("#$%&*@!?~^ ,.;:{}[]0123456789") for _ in range(80)))

    @classmethod
    def bad_response_format(cls) -> Reply:
        return cls(status=400, error="response_format json_schema is not supported", code="invalid_request")

    @classmethod
    def model_not_found(cls, model: str = "?") -> Reply:
        return cls(status=404, error=f"The model `{model}` does not exist", code="model_not_found")


@dataclass
class Received:
    """A request as the server saw it."""

    path: str
    json: dict[str, Any]
    headers: dict[str, str]  # names lower-cased
    time: float  # time.monotonic() at arrival


Responder = Callable[[dict[str, Any]], "str | list[str] | Reply"]


def count_tokens(text: str) -> int:
    """A rough, deterministic token count (about 4 characters per token), like a BPE tokenizer on English."""
    return max(1, (len(text) + 3) // 4) if text else 0


class FakeOpenAI:
    """`with FakeOpenAI() as server:` then point a client at `server.url` (ends in `/v1`)."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency: float = 0.0,
        models: Iterable[str] = ("fake-model",),
        reject_response_format: bool = False,
        owned_by: str = "fake",
    ):
        """`owned_by`: what `/models` says owns the models ("vllm" poses as a vLLM server)."""
        self.responder = responder
        self.latency = latency
        self.models = list(models)
        self.reject_response_format = reject_response_format
        self.owned_by = owned_by
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._stopping.set()  # wakes handlers sleeping in a delay
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -----------------------------------------------------------------------------------------
    def script(self, *replies: Reply | str) -> None:
        """Queue replies; each request consumes one, in arrival order, before the responder is asked."""
        with self._lock:
            self._script.extend(r if isinstance(r, Reply) else Reply(text=r) for r in replies)

    def clear(self) -> None:
        """Forget recorded requests and the in-flight high-water mark (e.g. after a client's start-up check)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    def completions(self, path_suffix: str = "") -> list[Received]:
        """Recorded generation requests (not `/models`), optionally only those whose path ends with a suffix."""
        with self._lock:
            return [r for r in self.requests if r.path != "/v1/models" and r.path.endswith(path_suffix)]

    # -- answering (called from handler threads) ------------------------------------------------------------
    def _next_reply(self, request: dict[str, Any], marker: str | None) -> Reply:
        with self._lock:
            reply = self._script.popleft() if self._script else Reply()
        if reply.text is None and reply.body is None and reply.status == 200:
            if self.responder:
                answer = self.responder({**request, MARKER: marker} if marker else request)
            else:
                answer = _default_text(request)
            if isinstance(answer, Reply):
                return answer
            reply = dataclasses.replace(
                reply, text=answer
            )  # a scripted delay / finish_reason keeps its fault
        return reply

    def _answer(
        self, path: str, request: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": self.owned_by} for m in self.models
            ]
            return 200, {}, json.dumps({"object": "list", "data": data}).encode()
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return _error(404, f"no route {path}", None)
        model = request.get("model")
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        if self.reject_response_format and "response_format" in request:
            return _error(400, "response_format is not supported by this server", "invalid_request")
        reply = self._next_reply(request, headers.get(MARKER_HEADER.lower()))
        if self.latency + reply.delay > 0 and self._stopping.wait(self.latency + reply.delay):
            return _error(503, "server stopping", None)
        if reply.status != 200:
            status, headers, body = _error(reply.status, reply.error or "error", reply.code)
            return status, {**headers, **reply.headers}, body
        if reply.body is not None:
            return 200, reply.headers, reply.body
        return 200, reply.headers, json.dumps(_completion(path, request, reply)).encode()


def _default_text(request: dict[str, Any]) -> str:
    """Echo a short, recognisable answer so tests can tell which request got which response."""
    if "messages" in request:
        last = request["messages"][-1]["content"] if request["messages"] else ""
        return f"answer to: {last}"
    return f" continued: {request.get('prompt', '')}"


def _completion(path: str, request: dict[str, Any], reply: Reply) -> dict[str, Any]:
    n = int(request.get("n") or 1)
    texts = reply.text if isinstance(reply.text, list) else [reply.text or ""] * n
    chat = path.endswith("/chat/completions")
    if chat:
        prompt_text = " ".join(str(m.get("content", "")) for m in request.get("messages", []))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
            for i, t in enumerate(texts)
        ]
    else:
        prompt_text = str(request.get("prompt", ""))
        choices = [
            {"index": i, "text": t, "finish_reason": reply.finish_reason, "logprobs": None}
            for i, t in enumerate(texts)
        ]
    prompt_tokens = count_tokens(prompt_text) + (4 * len(request.get("messages", [])) if chat else 0)
    completion_tokens = sum(count_tokens(t) for t in texts)
    return {
        "id": f"fake-{random.getrandbits(48):012x}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, message: str, code: str | None) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return status, {}, json.dumps(body).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops connections when 64+ clients connect at once

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Also drop keep-alive connections, so a stopped server looks dead to clients, as a crashed one would."""
        super().server_close()
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers do
    # http.server writes headers and body separately; with Nagle's algorithm the body would wait for the
    # client's delayed ACK (~40 ms a request). Real servers (uvicorn, nginx) set TCP_NODELAY too.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request stderr lines
        pass

    def do_GET(self) -> None:
        self._handle({})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:  # the client hung up mid-request (cancelled): nothing was asked
            return
        try:
            request = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            self._send(*_error(400, "request body is not JSON", None))
            return
        self._handle(request)

    def _handle(self, request: dict[str, Any]) -> None:
        fake = self.fake
        path = self.path.split("?", 1)[0]
        with fake._lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append(Received(path, request, headers, time.monotonic()))
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            try:
                answer = fake._answer(path, request, headers)
            except Exception as exc:  # a broken test responder: say so instead of dropping the connection
                answer = _error(500, f"fake server responder failed: {exc!r}", None)
            self._send(*answer)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to answer
            self.close_connection = True
