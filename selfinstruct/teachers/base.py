"""The one interface every teacher backend implements.

Pipelines build `TeacherRequest`s (chat messages or a raw prompt, plus `Sampling`) and get back
`TeacherResponse`s with the completions, finish reasons and token usage. They never know whether an HTTP
endpoint or an in-process vLLM engine answered.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class Sampling:
    """Decoding parameters; they map 1:1 onto vLLM's `SamplingParams` and (but for the two vLLM extensions
    `repetition_penalty` and `min_p`) onto the OpenAI API."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """vLLM's multiplicative penalty on every token already in the prompt or the text (1.0: off). Not an OpenAI
    parameter: sent to an HTTP endpoint only when set, in the request body vLLM's server reads it from."""
    min_p: float = 0.0
    """Drop tokens less likely than `min_p` times the most likely one (0: off); vLLM-only, like
    `repetition_penalty`."""
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    """When set (and the teacher has structured output enabled) the answer must match this JSON schema."""
    logprobs: int | None = None
    """When set, each choice also carries the `logprobs` most likely first tokens (`Choice.top_logprobs`); a
    teacher whose `supports_logprobs` is False refuses such a request."""


MARKER_HEADER = "X-Selfinstruct-Stage"
"""The HTTP header carrying `TeacherRequest.marker`."""


MARKER_SEPARATOR = "~"


def batch_line_id(custom_id: str, marker: str | None) -> str:
    """A Batch API line's custom id: the caller's id, then the request's marker (a batch line carries no
    headers, so the stage travels in its id, where a provider's dashboard shows it too)."""
    return custom_id if marker is None else f"{custom_id}{MARKER_SEPARATOR}{marker}"


def split_batch_line_id(line_id: str) -> tuple[str, str | None]:
    """(the caller's id, the marker or None) of a `batch_line_id`."""
    custom_id, _, marker = line_id.partition(MARKER_SEPARATOR)
    return custom_id, marker or None


@dataclass
class TeacherRequest:
    """Exactly one of `messages` (chat) or `prompt` (raw text a base model continues) is set.

    `tag` is the caller's own bookkeeping (round, prompt hash, seed ids shown); teachers pass it through.
    `marker` names the template the request was rendered from; an HTTP teacher sends it as the
    `X-Selfinstruct-Stage` header (servers ignore it; the fake server's scripted teachers answer by it).
    """

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tag: Any = None
    marker: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("TeacherRequest needs exactly one of messages or prompt")


@dataclass
class Choice:
    text: str
    finish_reason: str | None  # "stop", "length", … as the backend reports it
    top_logprobs: dict[str, float] | None = None
    """The first generated token's most likely alternatives, {token text: natural-log probability}, when the
    request asked for `Sampling.logprobs` (a backend may add the sampled token to the k it was asked for)."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TeacherResponse:
    """The answer to one request. `error` is set (and `choices` empty) when every retry failed."""

    request: TeacherRequest
    choices: list[Choice] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    structured: bool = False  # True when the backend enforced request.sampling.json_schema
    error: str | None = None
    cost: float = 0.0


@dataclass
class Totals:
    """Request, token and cost totals: a teacher's running count, or a run's over several sessions."""

    requests: int = 0
    failed_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @classmethod
    def of(cls, totals: Totals) -> Totals:
        """Just the totals of `totals` (e.g. of a `TeacherStats`, without its error breakdown)."""
        return cls(**{f.name: getattr(totals, f.name) for f in fields(cls)})

    def plus(self, other: Totals, sign: int = 1) -> Totals:
        return Totals(
            **{f.name: getattr(self, f.name) + sign * getattr(other, f.name) for f in fields(Totals)}
        )


@dataclass
class TeacherStats(Totals):
    """Running totals a progress bar and summary.json show, with failures by kind."""

    errors_by_kind: dict[str, int] = field(default_factory=dict)


class Teacher(abc.ABC):
    """An LLM that answers batches of requests.

    `generate` returns responses in request order; `stream` yields `(index, response)` as each finishes so a
    pipeline can filter early answers while later ones are still in flight. What differs between backends and
    matters to a pipeline is said by the capabilities below (`in_process`, `max_in_flight`, `batch_size`,
    `honours_per_request_seed`, `supports_logprobs`), so no code outside `teachers/` asks which backend it has.
    """

    model: str
    concurrency: int
    stats: TeacherStats

    in_process: ClassVar[bool] = False
    """True when the backend loads the model's weights itself (it needs a path or hub id, not a served name)."""

    def __init__(self, cfg: Any):
        """`cfg` is a `TeacherConfig`."""
        from selfinstruct.teachers.pricing import resolve_prices

        self.cfg = cfg
        self.model = cfg.model
        self.concurrency = cfg.concurrency_or_default
        self.stats = TeacherStats()
        self.prices = resolve_prices(cfg.model, cfg.price_input, cfg.price_output)

    @property
    def max_in_flight(self) -> int:
        """Requests a pipeline should keep in flight to keep this backend busy (`--concurrency`)."""
        return self.concurrency

    @property
    def batch_size(self) -> int:
        """Requests per `generate` call this backend prefers. 1: every request is its own call and its answer
        arrives as soon as it is ready (both backends schedule everything in flight together)."""
        return 1

    @property
    def honours_per_request_seed(self) -> bool:
        """Whether a pipeline should give each request its own `Sampling.seed` (known after `start()`)."""
        return True

    supports_logprobs: ClassVar[bool] = False
    """Whether answers carry `Choice.top_logprobs` when `Sampling.logprobs` asks for them."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect / load and fail fast (UserError) on a bad endpoint, model name or model path."""

    @abc.abstractmethod
    async def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResponse]: ...

    async def stream(self, requests: Sequence[TeacherRequest]) -> AsyncIterator[tuple[int, TeacherResponse]]:
        for i, response in enumerate(await self.generate(requests)):
            yield i, response

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or the engine."""
