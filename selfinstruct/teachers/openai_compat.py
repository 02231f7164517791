"""Teacher backend for any OpenAI-compatible endpoint: OpenAI, other providers, `vllm serve`, Ollama, llama.cpp.

Built on the official SDK's `AsyncOpenAI`, with the SDK's own retries off (`max_retries=0`): this module retries
itself so that every retry is counted in `TeacherStats`, `Retry-After` / `retry-after-ms` are honoured exactly,
and a retry can move to another endpoint of a fleet. What is retried: 408, 409, 429, 5xx, timeouts, connection
errors and bodies that do not parse. What is not: other 4xx (the request itself is wrong). A refused key or an
exhausted quota (401, 403, `insufficient_quota`) stops the run with a `UserError`: every request would fail.

Throughput controls, in the order a request meets them: a semaphore (`concurrency` in flight), token buckets
for requests/tokens per minute, then the endpoint with the fewest requests in flight. An endpoint that failed
twice in a row is skipped for a growing while, unless every endpoint is in that state. When a request has used
all its retries while every endpoint is failing, the teacher is unusable and `generate` raises `UserError`;
otherwise the request comes back with `error` set and the run goes on.

Per-request seeds (`Sampling.seed`) are sent unless `request_seed` is off, or it is left on auto and an endpoint
is a vLLM server (its `/models` list says `owned_by: "vllm"`): vLLM's CPU build crashes its engine ("CPU
Generator does not use offset") on a seeded request whose prompt is prefilled in chunks, which its server does
by default.

Structured output goes out as `response_format` JSON schema; if a server answers 400 to it and the same
request then works as plain text, schemas are dropped for the rest of the run (`TeacherResponse.structured`
says which). Servers that ignore `n` (Ollama, llama.cpp) are asked again until the n choices are there.

The API key is read from the environment at `start()`, lives only inside the SDK clients, and is masked in
every message this module produces.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from selfinstruct.errors import UserError
from selfinstruct.teachers.base import (
    MARKER_HEADER,
    Choice,
    Teacher,
    TeacherRequest,
    TeacherResponse,
    Usage,
    batch_line_id,
    split_batch_line_id,
)
from selfinstruct.teachers.config import TeacherConfig
from selfinstruct.teachers.pricing import cost

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
MAX_BACKOFF = 60.0
PROBE_TIMEOUT = 60.0
MAX_RETRY_AFTER = 600.0  # a server asking for longer is treated as asking for 10 minutes
DOWN_AFTER_FAILURES = 2  # consecutive failures before an endpoint is skipped
BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price
BATCH_WINDOW_H = 24  # the completion window a batch is created with: its answers come within this many hours
BATCH_LABEL = "selfinstruct_batch"  # metadata key naming the run's batch, to find it again after a restart
NO_KEY = "no-key"  # sent to local servers that need none; the SDK insists on some key
VLLM_EXTENSIONS = ("repetition_penalty", "min_p")  # sampling fields vLLM's server takes beyond OpenAI's


def is_local_url(url: str) -> bool:
    """Loopback, private-network and single-label hosts (cluster names) do not need an API key."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or "." not in host:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


# ---------------------------------------------------------------------------------------------- rate limits


class TokenBucket:
    """`per_minute` units per minute, with one second's worth of burst.

    A request bigger than the burst is let through once the bucket is full and leaves it in debt, so the
    long-run rate is exact whatever the request sizes. Waiters are served first come, first served.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        async with self._lock:
            self._refill()
            need = min(amount, self.capacity)
            if self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now


def estimate_tokens(request: TeacherRequest) -> int:
    """What a provider's TPM limiter charges up front: prompt (≈4 chars per token) + max_tokens × n."""
    if request.messages is not None:
        prompt = sum(len(m.get("content") or "") // 4 + 4 for m in request.messages)
    else:
        prompt = len(request.prompt or "") // 4
    return prompt + request.sampling.max_tokens * request.sampling.n


# ---------------------------------------------------------------------------------------------- endpoints


@dataclass
class _Endpoint:
    url: str
    client: openai.AsyncOpenAI
    official: bool  # api.openai.com wants max_completion_tokens on chat
    in_flight: int = 0
    served: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0
    last_error: str = ""

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def succeeded(self) -> None:
        self.failures, self.down_until = 0, 0.0

    def failed(self, failure: _Failure, backoff: float) -> None:
        self.failures += 1
        self.last_error = failure.message
        now = time.monotonic()
        if failure.retry_after is not None:
            self.down_until = max(self.down_until, now + failure.retry_after)
        if self.failures >= DOWN_AFTER_FAILURES:
            pause = min(MAX_BACKOFF, backoff * 2 ** (self.failures - DOWN_AFTER_FAILURES))
            self.down_until = max(self.down_until, now + pause)


@dataclass
class _Failure:
    kind: str  # key of TeacherStats.errors_by_kind: timeout, connection, bad_body, http_429, …
    message: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None
    fatal: bool = False  # the key or the account is refused: stop the run


class _BadBody(Exception):
    """A 200 answer without usable choices."""


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `retry-after` (seconds) or `retry-after` (HTTP date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(value) / scale))
        except ValueError:
            if name == "retry-after":
                try:
                    when = email.utils.parsedate_to_datetime(value)
                except (TypeError, ValueError):
                    return None
                return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))
    return None


def _error_field(exc: openai.APIStatusError, name: str) -> str | None:
    """A field of the provider's error object (the SDK may or may not have unwrapped `{"error": {...}}`)."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    value = inner.get(name) if isinstance(inner, dict) else None
    return str(value) if value else None


def _classify(exc: Exception) -> _Failure:
    if isinstance(exc, openai.APITimeoutError):
        return _Failure("timeout", "request timed out", True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return _Failure("connection", f"connection failed ({cause or exc})", True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"HTTP {status}: {_error_field(exc, 'message') or exc.message}"
        if status in (401, 403) or _error_field(exc, "code") == "insufficient_quota":
            return _Failure(f"http_{status}", message, False, status, fatal=True)  # every request would fail
        if status in (408, 409, 429) or status >= 500:
            retry_after = _retry_after(exc.response.headers)
            return _Failure(f"http_{status}", message, True, status, retry_after)
        return _Failure(f"http_{status}", message, False, status)
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError, _BadBody)):
        return _Failure("bad_body", f"unparseable response body ({exc})", True)
    raise exc


def _chat_top(logprobs: Any) -> dict[str, float] | None:
    """The first generated token's alternatives from a chat answer's `logprobs.content`."""
    content = getattr(logprobs, "content", None)
    if not content:
        return None
    first = content[0]
    top = {t.token: t.logprob for t in first.top_logprobs or []}
    return top or {first.token: first.logprob}


def _completion_top(logprobs: Any) -> dict[str, float] | None:
    """The first generated token's alternatives from a legacy completion's `logprobs.top_logprobs`."""
    top = getattr(logprobs, "top_logprobs", None)
    return dict(top[0]) if top and top[0] else None


# ---------------------------------------------------------------------------------------------- teacher


class OpenAITeacher(Teacher):
    supports_logprobs = True  # the API's `logprobs`; a server that answers without them is a bad body

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        self.structured_supported = True  # turned off for the run when a server rejects response_format
        self._send_seeds = cfg.request_seed is not False  # auto: decided in start() by asking the endpoints
        self._urls = cfg.base_url or [os.environ.get("OPENAI_BASE_URL") or OPENAI_URL]
        self._endpoints: list[_Endpoint] = []
        self._secret = ""
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self._tpm = TokenBucket(cfg.tpm) if cfg.tpm else None

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build one client per base URL, then send each a 1-token request to check URL, key and model.

        A real request is the one check that means the same thing on OpenAI, vLLM, Ollama and llama.cpp
        (`/models` lists aliases differently, and llama.cpp ignores the model name altogether).
        """
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if not key:
            remote = [u for u in self._urls if not is_local_url(u)]
            if remote and self.cfg.api_key_env:
                raise UserError(f"set the API key in ${self.cfg.api_key_env} (needed for {remote[0]})")
            key = NO_KEY
        self._secret = key if key != NO_KEY and len(key) >= 4 else ""  # masking "x" would mangle messages
        timeout = openai.Timeout(self.cfg.timeout, connect=min(10.0, self.cfg.timeout))
        self._endpoints = [
            _Endpoint(
                url,
                openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout),
                official=urlsplit(url).hostname == "api.openai.com",
            )
            for url in self._urls
        ]
        auto_seed = self.cfg.request_seed is None
        results, is_vllm = await asyncio.gather(
            asyncio.gather(*(self._probe(ep) for ep in self._endpoints)),
            asyncio.gather(*(self._is_vllm(ep) for ep in self._endpoints if auto_seed)),
        )
        dead = [(ep, why) for ep, why in zip(self._endpoints, results, strict=True) if why]
        if len(dead) == len(self._endpoints):
            ep, why = dead[0]
            raise UserError(self._redact(f"cannot reach teacher at {ep.url}: {why}"))
        for ep, why in dead:
            log.warning(self._redact(f"teacher endpoint {ep.url} is unreachable ({why}); using the others"))
            ep.failures, ep.down_until = DOWN_AFTER_FAILURES, time.monotonic() + MAX_BACKOFF
        if auto_seed:
            self._send_seeds = not any(is_vllm)

    @property
    def honours_per_request_seed(self) -> bool:
        return self._send_seeds

    async def _is_vllm(self, ep: _Endpoint) -> bool:
        """vLLM's OpenAI server lists its models as `owned_by: "vllm"`; a server without `/models` is not it.

        Asked on a client of its own, so the check leaves no pooled connection behind in the endpoint's client.
        """
        async with openai.AsyncOpenAI(base_url=ep.url, api_key=ep.client.api_key, max_retries=0) as probe:
            try:
                page = await probe.models.list(timeout=min(PROBE_TIMEOUT, self.cfg.timeout))
            except (openai.OpenAIError, ValueError):
                return False
        return any(getattr(m, "owned_by", None) == "vllm" for m in page.data)

    async def _probe(self, ep: _Endpoint) -> str | None:
        """None when usable; a reason when unreachable; UserError when the model or key is wrong."""
        probe = TeacherRequest(
            messages=[{"role": "user", "content": "Say OK."}] if self.cfg.api == "chat" else None,
            prompt="OK" if self.cfg.api == "completions" else None,
        )
        probe.sampling.max_tokens = 1
        try:
            await self._call(ep, probe, structured=False, timeout=min(PROBE_TIMEOUT, self.cfg.timeout))
            return None
        except Exception as exc:
            failure = _classify(exc)
        if failure.kind in ("timeout", "connection"):
            return failure.message
        if failure.status in (401, 403):
            source = f"${self.cfg.api_key_env}" if self._secret else "no key set"
            raise UserError(self._redact(f"{ep.url} rejected the API key ({source}): {failure.message}"))
        if failure.fatal:
            raise UserError(self._redact(f"{ep.url} refused the request: {failure.message}"))
        if failure.status == 404:
            hint = " (a chat-only endpoint has no /completions)" if self.cfg.api == "completions" else ""
            raise UserError(
                self._redact(
                    f"model {self.model!r} ({self.cfg.api} API) not found at {ep.url}{hint}: {failure.message}"
                )
            )
        log.warning(self._redact(f"teacher check at {ep.url} answered {failure.message}; going on"))
        return None

    async def close(self) -> None:
        for ep in self._endpoints:
            await ep.client.close()

    # -- generation ----------------------------------------------------------------------------------------
    async def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResponse]:
        out: list[TeacherResponse | None] = [None] * len(requests)
        async for i, response in self.stream(requests):
            out[i] = response
        return out  # type: ignore[return-value]  # every slot is filled

    async def stream(self, requests: Sequence[TeacherRequest]) -> AsyncIterator[tuple[int, TeacherResponse]]:
        """Yield `(index, response)` in completion order; closing the iterator early cancels the rest."""

        async def indexed(i: int, request: TeacherRequest) -> tuple[int, TeacherResponse]:
            return i, await self._all_choices(request)

        tasks = [asyncio.ensure_future(indexed(i, r)) for i, r in enumerate(requests)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _all_choices(self, request: TeacherRequest) -> TeacherResponse:
        """Servers that ignore `n` (Ollama, llama.cpp) answer once: ask again (next seed) for the rest."""
        response = await self._complete(request)
        s = request.sampling
        while response.error is None and len(response.choices) < s.n:
            seed = None if s.seed is None else s.seed + len(response.choices)
            sampling = replace(s, n=s.n - len(response.choices), seed=seed)
            more = await self._complete(replace(request, sampling=sampling))
            if more.error is not None:
                break  # keep the choices we have
            response.choices += more.choices
            response.usage.prompt_tokens += more.usage.prompt_tokens
            response.usage.completion_tokens += more.usage.completion_tokens
            response.cost += more.cost
            response.structured = response.structured and more.structured
        return response

    async def _complete(self, request: TeacherRequest) -> TeacherResponse:
        structured = request.sampling.json_schema is not None and self.cfg.structured_output
        attempt = 0
        last: _Endpoint | None = None  # where the previous attempt failed: a retry goes elsewhere if it can
        # a 400 to a schema request may mean "no response_format here": confirmed if plain text then works
        rejected: tuple[_Endpoint, _Failure] | None = None
        async with self._semaphore:
            while True:
                structured = structured and self.structured_supported
                if self._rpm:
                    await self._rpm.take(1)
                if self._tpm:
                    await self._tpm.take(estimate_tokens(request))
                ep = self._pick(avoid=last)
                ep.in_flight += 1
                ep.served += 1
                try:
                    choices, usage = await self._call(ep, request, structured)
                except asyncio.CancelledError:  # given up (Ctrl-C, target reached): it was sent, so it counts
                    self.stats.requests += 1
                    raise
                except Exception as exc:
                    failure = _classify(exc)
                else:
                    ep.succeeded()
                    if rejected is not None:  # the same request worked as plain text: the schema was refused
                        self._structured_rejected(*rejected)
                    return self._account(TeacherResponse(request, choices, usage, structured=structured))
                finally:
                    ep.in_flight -= 1

                last = ep
                self.stats.errors_by_kind[failure.kind] = self.stats.errors_by_kind.get(failure.kind, 0) + 1
                if structured and failure.status in (400, 422):
                    structured, rejected = False, (ep, failure)
                    continue
                if failure.fatal:
                    raise UserError(self._redact(f"{ep.url} refused the request: {failure.message}"))
                if not failure.retryable:
                    return self._give_up(request, ep, failure, attempt)
                ep.failed(failure, self.cfg.backoff)
                if attempt >= self.cfg.max_retries:
                    if not any(e.up(time.monotonic()) for e in self._endpoints):
                        raise UserError(self._redact(self._all_failing()))
                    return self._give_up(request, ep, failure, attempt)
                attempt += 1
                self.stats.retries += 1
                await asyncio.sleep(self._retry_delay(ep, failure, attempt))

    def _pick(self, avoid: _Endpoint | None) -> _Endpoint:
        """Fewest in flight among healthy endpoints (ties: the least used), preferring not to reuse `avoid`;
        if none is healthy, the one that comes back first."""
        now = time.monotonic()
        healthy = [e for e in self._endpoints if e.up(now)]
        if not healthy:
            return min(self._endpoints, key=lambda e: e.down_until)
        others = [e for e in healthy if e is not avoid] or healthy
        return min(others, key=lambda e: (e.in_flight, e.served))

    def _retry_delay(self, failed: _Endpoint, failure: _Failure, attempt: int) -> float:
        """Go straight to another healthy endpoint if there is one; else Retry-After or jittered backoff."""
        now = time.monotonic()
        if any(e is not failed and e.up(now) for e in self._endpoints):
            return 0.0
        if failure.retry_after is not None:
            return failure.retry_after
        return min(MAX_BACKOFF, self.cfg.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _structured_rejected(self, ep: _Endpoint, failure: _Failure) -> None:
        if self.structured_supported:
            self.structured_supported = False
            log.warning(
                self._redact(
                    f"{ep.url} rejected response_format ({failure.message}); using plain text this run"
                )
            )

    def _give_up(
        self, request: TeacherRequest, ep: _Endpoint, failure: _Failure, attempt: int
    ) -> TeacherResponse:
        self.stats.requests += 1
        self.stats.failed_requests += 1
        tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
        return TeacherResponse(
            request, error=self._redact(f"{failure.message} (after {tries}, last at {ep.url})")
        )

    def _all_failing(self) -> str:
        reasons = "; ".join(f"{e.url}: {e.last_error or 'unreachable'}" for e in self._endpoints)
        return f"every teacher endpoint keeps failing after {self.cfg.max_retries} retries: {reasons}"

    def _account(self, response: TeacherResponse, discount: float = 1.0) -> TeacherResponse:
        response.cost = cost(response.usage, self.prices) * discount
        s = self.stats
        s.requests += 1
        s.prompt_tokens += response.usage.prompt_tokens
        s.completion_tokens += response.usage.completion_tokens
        s.cost += response.cost
        return response

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    # -- one HTTP call -------------------------------------------------------------------------------------
    def _body(self, ep: _Endpoint, request: TeacherRequest, structured: bool) -> dict[str, Any]:
        """The JSON body of one generation request (the same for a direct call and a Batch API line)."""
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "n": s.n, "temperature": s.temperature, "top_p": s.top_p}
        # Penalties only when set: some models (OpenAI reasoning models) reject even the default values.
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if s.min_p:
            body["min_p"] = s.min_p
        if s.stop:
            body["stop"] = s.stop
        if s.seed is not None and self._send_seeds:
            body["seed"] = s.seed
        if request.messages is not None:
            body["messages"] = request.messages
            body["max_completion_tokens" if ep.official else "max_tokens"] = s.max_tokens
            if s.logprobs is not None:
                body["logprobs"], body["top_logprobs"] = True, s.logprobs
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = s.max_tokens
            if s.logprobs is not None:
                body["logprobs"] = s.logprobs
        if structured:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": s.json_schema, "strict": True},
            }
        return body

    async def _call(
        self, ep: _Endpoint, request: TeacherRequest, structured: bool, timeout: float | None = None
    ) -> tuple[list[Choice], Usage]:
        args = self._body(ep, request, structured)
        if timeout is not None:
            args["timeout"] = timeout
        if request.marker is not None:
            args["extra_headers"] = {MARKER_HEADER: request.marker}
        # Not in the client's signatures; vLLM's server reads them from the body. The legacy API lacks
        # response_format too.
        extra = [k for k in VLLM_EXTENSIONS if k in args]
        if request.messages is None and "response_format" in args:
            extra.append("response_format")
        if extra:
            args["extra_body"] = {k: args.pop(k) for k in extra}
        if request.messages is not None:
            out: Any = await ep.client.chat.completions.create(**args)
        else:
            out = await ep.client.completions.create(**args)
        return self._parse(out, request)

    def _parse(self, out: Any, request: TeacherRequest) -> tuple[list[Choice], Usage]:
        """Choices and usage of a chat or legacy completion object."""
        s = request.sampling
        if request.messages is not None:
            raw = [
                (c.index, c.message.content if c.message else None, c.finish_reason, _chat_top(c.logprobs))
                for c in out.choices or []
            ]
        else:
            raw = [(c.index, c.text, c.finish_reason, _completion_top(c.logprobs)) for c in out.choices or []]
        if not raw:
            raise _BadBody("no choices")
        choices = [
            Choice(text or "", reason, top) for _, text, reason, top in sorted(raw, key=lambda c: c[0] or 0)
        ]
        if s.logprobs is not None and any(c.top_logprobs is None for c in choices):
            raise _BadBody("logprobs were asked for but the answer has none")
        if out.usage is not None:
            usage = Usage(out.usage.prompt_tokens or 0, out.usage.completion_tokens or 0)
        else:  # some servers omit usage: estimate so cost and throughput stay meaningful
            usage = Usage(
                estimate_tokens(request) - s.max_tokens * s.n, sum(len(c.text) // 4 for c in choices)
            )
        return choices, usage

    # -- Batch API -----------------------------------------------------------------------------------------
    # Half price for answers within 24 h: a stage whose requests do not depend on each other's answers uploads
    # them as one JSONL file, creates a batch, polls it and downloads the output and error files. Batches go to
    # the first base URL (a fleet of local servers has no Batch API; OpenAI's is one endpoint).

    async def submit_batch(
        self, requests: Sequence[TeacherRequest], custom_ids: Sequence[str], label: str
    ) -> str:
        """Upload `requests` (one line each, under its custom id) and create a batch; returns the batch id.

        `label` is put into the batch's metadata, so a restart that lost the id can find it (`find_batch`)."""
        ep = self._endpoints[0]
        url = "/v1/chat/completions" if self.cfg.api == "chat" else "/v1/completions"
        lines = [
            json.dumps(
                {
                    "custom_id": batch_line_id(cid, r.marker),
                    "method": "POST",
                    "url": url,
                    "body": self._body(ep, r, self._structured(r)),
                },
                ensure_ascii=False,
            )
            for cid, r in zip(custom_ids, requests, strict=True)
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        file = await self._batch_call(
            lambda: ep.client.files.create(
                file=(f"{label}.jsonl", data, "application/jsonl"), purpose="batch"
            )
        )
        batch = await self._batch_call(
            lambda: ep.client.batches.create(
                input_file_id=file.id,
                endpoint=url,  # type: ignore[arg-type]
                completion_window=f"{BATCH_WINDOW_H}h",
                metadata={BATCH_LABEL: label},
            )
        )
        return batch.id

    async def find_batch(self, label: str) -> str | None:
        """The id of a recent batch created with `label`, if the provider has one."""
        ep = self._endpoints[0]
        page = await self._batch_call(lambda: ep.client.batches.list(limit=100))
        for batch in page.data:
            if (batch.metadata or {}).get(BATCH_LABEL) == label:
                return batch.id
        return None

    async def batch_status(self, batch_id: str) -> Any:
        """The provider's batch object (`status`, `request_counts`, `output_file_id`, `error_file_id`)."""
        ep = self._endpoints[0]
        return await self._batch_call(lambda: ep.client.batches.retrieve(batch_id))

    async def batch_results(self, batch: Any, requests: dict[str, TeacherRequest]) -> list[TeacherResponse]:
        """Responses for the lines of a finished batch's output and error files (custom id -> request)."""
        ep = self._endpoints[0]
        out: list[TeacherResponse] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._batch_call(lambda fid=file_id: ep.client.files.content(fid))
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                request = requests.get(split_batch_line_id(str(item.get("custom_id", "")))[0])
                if request is not None:
                    out.append(self._batch_response(request, item))
        return out

    def _structured(self, request: TeacherRequest) -> bool:
        return (
            request.sampling.json_schema is not None
            and self.cfg.structured_output
            and self.structured_supported
        )

    def _batch_response(self, request: TeacherRequest, item: dict[str, Any]) -> TeacherResponse:
        response = item.get("response") or {}
        body = response.get("body") or {}
        status = response.get("status_code")
        if status == 200 and not item.get("error"):
            parsed_type: Any = ChatCompletion if request.messages is not None else Completion
            try:
                choices, usage = self._parse(parsed_type.model_validate(body), request)
            except (ValueError, _BadBody) as exc:  # pydantic's ValidationError is a ValueError
                problem = f"unparseable answer ({exc})"
            else:
                answer = TeacherResponse(request, choices, usage, structured=self._structured(request))
                return self._account(answer, BATCH_DISCOUNT)
        else:
            error = item.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
            problem = f"HTTP {status}: {error.get('message') or error}"
        self.stats.requests += 1
        self.stats.failed_requests += 1
        self.stats.errors_by_kind["batch"] = self.stats.errors_by_kind.get("batch", 0) + 1
        return TeacherResponse(request, error=self._redact(f"batch request failed: {problem}"))

    async def _batch_call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """One Files/Batches API call, retried like a generation request; anything else stops the run."""
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                failure = _classify(exc)
            if failure.fatal or not failure.retryable or attempt >= self.cfg.max_retries:
                raise UserError(self._redact(f"Batch API at {self._endpoints[0].url}: {failure.message}"))
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(
                failure.retry_after or min(MAX_BACKOFF, self.cfg.backoff * 2 ** (attempt - 1))
            )
