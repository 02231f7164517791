"""A small OpenAI-compatible HTTP server that stands in for paid remote APIs in tests and benchmarks.

It speaks real HTTP on 127.0.0.1 (random port) from a background thread, so the `openai` SDK, its transport,
timeouts and connection pooling are exercised exactly as against a real provider. Each request is answered
by the next scripted `Reply` in the queue, else by the responder callback, else by a default text. Replies
can inject the faults a real provider produces: 429 with Retry-After, 5xx, slow answers, empty or truncated
bodies, `finish_reason="length"`, garbage, a 400 for `response_format` or for `logprobs`, a 404 for an unknown
model. Requests asking for logprobs get the first token's top k in the API's own shape (chat
`logprobs.content[0].top_logprobs`, legacy `logprobs.top_logprobs[0]`), from `Reply.top_logprobs`.

It also speaks the Files and Batches APIs (`/v1/files`, `/v1/files/{id}/content`, `/v1/batches`,
`/v1/batches/{id}`): a batch stays `in_progress` for `batch_delay` seconds, then its lines are answered like
direct requests (responder, script, faults) into an output file (status 200) and an error file (the rest).
`batch_creations` counts created batches, so a test can tell a resumed batch from a resubmitted one.

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
import email.parser
import email.policy
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from selfinstruct.teachers.base import MARKER_HEADER, split_batch_line_id

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
    top_logprobs: dict[str, float] | None = None
    """The first token's alternatives {token: logprob} sent when the request asks for logprobs (the k most
    likely of them, as a real server cuts them); None: the first word of the text, with logprob 0."""

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
        batch_delay: float = 0.0,
        batch_api: bool = True,
        reject_logprobs: bool = False,
    ):
        """`owned_by`: what `/models` says owns the models ("vllm" poses as a vLLM server);
        `reject_logprobs`: answer 400 to requests asking for logprobs, as some servers do."""
        self.responder = responder
        self.latency = latency
        self.models = list(models)
        self.reject_response_format = reject_response_format
        self.owned_by = owned_by
        self.batch_delay = batch_delay
        self.batch_api = batch_api  # False: 404 on the Files/Batches routes, as `vllm serve` answers
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (filename, content)
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_creations = 0
        self.reject_logprobs = reject_logprobs
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.busy_s = 0.0  # seconds requests spent in the server, summed: ÷ a wall time = mean in flight
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
        """Forget recorded requests, the in-flight high-water mark and busy time (e.g. after a client's start-up
        check)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight
            self.busy_s = 0.0

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
        if path.startswith(("/v1/files", "/v1/batches")):
            return self._batch_api(path, request) if self.batch_api else _error(404, f"no route {path}", None)
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
        if self.reject_logprobs and (request.get("logprobs") or request.get("top_logprobs")):
            return _error(400, "logprobs are not supported by this server", "invalid_request")
        reply = self._next_reply(request, headers.get(MARKER_HEADER.lower()))
        if self.latency + reply.delay > 0 and self._stopping.wait(self.latency + reply.delay):
            return _error(503, "server stopping", None)
        if reply.status != 200:
            status, headers, body = _error(reply.status, reply.error or "error", reply.code)
            return status, {**headers, **reply.headers}, body
        if reply.body is not None:
            return 200, reply.headers, reply.body
        return 200, reply.headers, json.dumps(_completion(path, request, reply)).encode()

    # -- Files and Batches APIs ------------------------------------------------------------------------------
    def _batch_api(self, path: str, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        parts = path.strip("/").split("/")[1:]  # ["files"], ["files", id, "content"], ["batches", id]
        if parts == ["files"] and "_multipart" in request:
            filename, content = request["_multipart"].get("file", ("", b""))
            purpose = request["_multipart"].get("purpose", ("", b""))[1].decode()
            file_id = f"file-{random.getrandbits(48):012x}"
            with self._lock:
                self.files[file_id] = (filename, content)
            return _ok(_file_object(file_id, filename, len(content), purpose))
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            with self._lock:
                found = self.files.get(parts[1])
            return (200, {}, found[1]) if found else _error(404, f"No such File object: {parts[1]}", None)
        if parts == ["batches"] and request:  # POST: create
            with self._lock:
                if request.get("input_file_id") not in self.files:
                    return _error(400, f"input file {request.get('input_file_id')} not found", None)
                batch_id = f"batch_{random.getrandbits(48):012x}"
                self.batch_creations += 1
                self.batches[batch_id] = {
                    "id": batch_id,
                    "object": "batch",
                    "endpoint": request.get("endpoint"),
                    "input_file_id": request["input_file_id"],
                    "completion_window": request.get("completion_window", "24h"),
                    "status": "in_progress",
                    "created_at": int(time.time()),
                    "metadata": request.get("metadata"),
                    "output_file_id": None,
                    "error_file_id": None,
                    "request_counts": {"total": 0, "completed": 0, "failed": 0},
                    "_ready_at": time.monotonic() + self.batch_delay,
                }
            return self._batch_object(batch_id)
        if parts == ["batches"]:  # GET: list
            with self._lock:
                ids = list(self.batches)[::-1]
            data = [json.loads(self._batch_object(i)[2]) for i in ids]
            return _ok({"object": "list", "data": data, "has_more": False})
        if len(parts) == 2 and parts[0] == "batches":
            with self._lock:
                batch = self.batches.get(parts[1])
                run_now = batch is not None and batch["status"] == "in_progress"
                run_now = run_now and time.monotonic() >= batch["_ready_at"]
                if run_now:
                    batch["status"] = "finalizing"  # one request runs it; concurrent polls see it finalizing
            if batch is None:
                return _error(404, f"No such batch: {parts[1]}", None)
            if run_now:
                self._run_batch(batch)
            return self._batch_object(parts[1])
        return _error(404, f"no route {path}", None)

    def _run_batch(self, batch: dict[str, Any]) -> None:
        """Answer every line as a direct request; 200s go to the output file, the rest to the error file."""
        _, content = self.files[batch["input_file_id"]]
        done, failed = [], []
        for raw in content.decode("utf-8").splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            _, marker = split_batch_line_id(str(line["custom_id"]))  # a batch line has no headers
            headers = {MARKER_HEADER.lower(): marker} if marker else {}
            with self._lock:
                self.requests.append(Received(line["url"], line["body"], headers, time.monotonic()))
            status, _, body = self._answer(line["url"], line["body"], headers)
            result = {
                "id": f"batch_req_{random.getrandbits(48):012x}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": "fake", "body": json.loads(body)},
                "error": None,
            }
            (done if status == 200 else failed).append(json.dumps(result))
        with self._lock:
            for key, lines in (("output_file_id", done), ("error_file_id", failed)):
                if lines:
                    file_id = f"file-{random.getrandbits(48):012x}"
                    self.files[file_id] = (f"{key}.jsonl", ("\n".join(lines) + "\n").encode())
                    batch[key] = file_id
            batch["request_counts"] = {
                "total": len(done) + len(failed),
                "completed": len(done),
                "failed": len(failed),
            }
            batch["status"] = "completed"
            batch["completed_at"] = int(time.time())

    def _batch_object(self, batch_id: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            batch = {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}
        return _ok(batch)


def _file_object(file_id: str, filename: str, size: int, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def _ok(obj: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps(obj).encode()


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, content)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = (part.get_filename() or "", part.get_payload(decode=True) or b"")
    return fields


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
        k = int(request.get("top_logprobs") or 0) if request.get("logprobs") else None
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": reply.finish_reason,
                "logprobs": None if k is None else _chat_logprobs(_top(reply, t, k)),
            }
            for i, t in enumerate(texts)
        ]
    else:
        prompt_text = str(request.get("prompt", ""))
        k = request.get("logprobs")
        choices = [
            {
                "index": i,
                "text": t,
                "finish_reason": reply.finish_reason,
                "logprobs": None if k is None else _completion_logprobs(_top(reply, t, int(k))),
            }
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


def _top(reply: Reply, text: str, k: int) -> dict[str, float]:
    """The k most likely first tokens of the answer (at least the first one, as servers also send the sampled
    token)."""
    first = re.match(r"\s*\S+", text)
    top = reply.top_logprobs or {first.group(0) if first else text: 0.0}
    return dict(sorted(top.items(), key=lambda kv: -kv[1])[: max(1, k)])


def _chat_logprobs(top: dict[str, float]) -> dict[str, Any]:
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
    return {"content": [{**entries[0], "top_logprobs": entries}]}


def _completion_logprobs(top: dict[str, float]) -> dict[str, Any]:
    first, lp = next(iter(top.items()))
    return {"tokens": [first], "token_logprobs": [lp], "top_logprobs": [top], "text_offset": [0]}


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
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            self._handle({"_multipart": _parse_multipart(content_type, raw)})
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
        received = time.monotonic()
        with fake._lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append(Received(path, request, headers, received))
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
                fake.busy_s += time.monotonic() - received

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
