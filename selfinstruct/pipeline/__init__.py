"""The two pipelines as sequences of stages, and the context every stage shares.

Self-Instruct: bootstrap → classify → instances → finetune. Alpaca: alpaca → finetune. Each teacher-driven
stage is resumable on its own: it derives what is left to do from the append-only files in the run directory
(bootstrap: the kept instructions; classify/instances: instruction ids without a result), so rerunning the
same command continues where a crash, Ctrl-C or budget cap stopped it. `finetune` is cheap and rebuilds
`corpus.jsonl` from those files every time.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selfinstruct.errors import UserError
from selfinstruct.pipeline.runner import Budget, Journal, drive
from selfinstruct.prompts import Prompts
from selfinstruct.records import SeedTask
from selfinstruct.shard import Shard
from selfinstruct.store import RunDir, read_jsonl
from selfinstruct.teachers.base import Sampling, Teacher, TeacherRequest, TeacherResponse

if TYPE_CHECKING:
    from selfinstruct.generate import GenerateConfig

STAGES: dict[str, tuple[str, ...]] = {
    "self-instruct": ("bootstrap", "classify", "instances", "finetune"),
    "alpaca": ("alpaca", "finetune"),
}

# Files of the run directory (RUN_CONTRACT.md).
INSTRUCTIONS = "instructions.jsonl"
REJECTED = "rejected.jsonl"
CLASSIFICATION = "classification.jsonl"
INSTANCES = "instances.jsonl"
CORPUS = "corpus.jsonl"
JOURNALED = (INSTRUCTIONS, REJECTED, CLASSIFICATION, INSTANCES)

MAX_FAILURES_IN_A_ROW = 20
"""Answers that failed after all retries, in a row, before the run gives up (e.g. every request gets a 400)."""

# ---------------------------------------------------------------- decoding presets

REFERENCE_DECODING: dict[str, dict[str, Any]] = {
    "bootstrap": {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0, "max_tokens": 1024},
    "classify": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3},
    "instances": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 1.5, "max_tokens": 300},
    "alpaca": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3072},
}
"""The reference implementations' values (DESIGN.md §2), tuned for GPT-3 continuing plain text."""

CHAT_DECODING: dict[str, dict[str, Any]] = {
    "bootstrap": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 1024},
    "classify": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 32},
    "instances": {"temperature": 0.7, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 1024},
    "alpaca": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3072},
}
"""For chat models answering in JSON: a presence penalty punishes the repeated JSON keys, top_p 0.5 narrows an
already narrow chat distribution, `{"is_classification": false}` does not fit in 3 tokens, and greedy instance
generation makes small models loop (SmolLM2-135M: 10 of 15 tasks survived the finetune filters at temperature 0,
15 of 15 at 0.7)."""


def resolve_decoding(cfg: GenerateConfig) -> dict[str, dict[str, Any]]:
    """Per-stage decoding: the preset (auto = reference for base models, chat otherwise) + explicit overrides."""
    preset = cfg.decoding
    if preset == "auto":
        preset = "reference" if cfg.teacher.api == "completions" else "chat"
    table = REFERENCE_DECODING if preset == "reference" else CHAT_DECODING
    out = {stage: dict(values) for stage, values in table.items()}
    for stage, values in out.items():
        for key in values:
            override = getattr(cfg, f"{stage}_{key}", None)
            if override is not None:
                values[key] = override
    return out


# ---------------------------------------------------------------- counters


@dataclass
class StageStats:
    """What one stage did; cumulative over sessions for counts derived from the files, per session otherwise."""

    total: int = 0  # the target (bootstrap/alpaca) or the number of items to process
    done: int = 0  # kept instructions, or items processed
    candidates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    parse_failures: int = 0
    requests: int = 0  # this session
    failed_requests: int = 0  # this session
    prompt_tokens: int = 0  # this session (`selfinstruct plan` reads the observed usage per stage)
    completion_tokens: int = 0  # this session
    elapsed_s: float = 0.0  # this session
    cpu_s: float = 0.0  # this session: process CPU time spent in the stage
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "total": self.total,
            "done": self.done,
            "candidates": self.candidates,
            "rejected_by_reason": dict(self.rejected.most_common()),
            "parse_failures": self.parse_failures,
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "elapsed_s": round(self.elapsed_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "finished": self.finished,
        }
        d.update(self.extra)
        return d


# ---------------------------------------------------------------- context


@dataclass
class RunContext:
    """Everything a stage needs: settings, seeds, teacher, templates, the journal and the shared counters."""

    cfg: GenerateConfig
    run: RunDir
    seeds: list[SeedTask]
    teacher: Teacher
    prompts: Prompts
    journal: Journal
    budget: Budget
    decoding: dict[str, dict[str, Any]]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: dict[str, StageStats] = field(default_factory=dict)
    on_tick: Callable[[str], None] = lambda stage: None
    stop_reason: str | None = None  # why the run stopped early: a budget cap, "interrupted", "no_progress"
    _failures_in_a_row: int = 0

    @property
    def chat(self) -> bool:
        return self.cfg.teacher.api == "chat"

    @property
    def request_batch(self) -> int:
        """Requests per teacher call: `--request-batch`, else what the teacher prefers (its `batch_size`)."""
        return self.cfg.request_batch or self.teacher.batch_size

    @property
    def slots(self) -> int:
        """Teacher calls in flight at once: enough to keep `max_in_flight` requests going."""
        return max(1, self.teacher.max_in_flight // self.request_batch)

    def sampling(self, stage: str, key: object, **extra: Any) -> Sampling:
        """The stage's decoding, `extra` added or overriding. A teacher that honours per-request seeds also gets one, derived from `--seed`
        and a request key, so a rerun asks the same questions with the same seeds."""
        values = {**self.decoding[stage], **extra}  # `extra` may override the preset
        if not self.teacher.honours_per_request_seed:
            return Sampling(**values)
        digest = hashlib.blake2b(f"{self.cfg.seed}:{stage}:{key}".encode(), digest_size=4).digest()
        return Sampling(**values, seed=int.from_bytes(digest, "big") >> 1)

    def accept(self, stage: str, response: TeacherResponse) -> bool:
        """Count one answer; False for a failed one (its items stay to do). Too many failures in a row abort."""
        stats = self.stats[stage]
        stats.requests += 1
        stats.prompt_tokens += response.usage.prompt_tokens
        stats.completion_tokens += response.usage.completion_tokens
        if response.error is None:
            self._failures_in_a_row = 0
            return True
        stats.failed_requests += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise UserError(
                f"the teacher failed {self._failures_in_a_row} requests in a row; last: {response.error}"
            )
        return False

    def can_send(self, in_flight: int) -> int:
        """How many more requests the budget allows right now (0 = stop starting new ones)."""
        if self.stop_reason is not None:
            return 0
        cap = self.budget.exhausted(in_flight)
        if cap is not None:
            self.stop_reason = cap
            return 0
        left = self.budget.requests_left(in_flight)
        return self.request_batch if left is None else min(self.request_batch, left)

    def reject_record(
        self,
        stage: str,
        text: str,
        reason: str,
        round_: int,
        nearest: tuple[str, float] | None = None,
        **meta: Any,
    ) -> dict[str, Any]:
        self.stats[stage].rejected[reason] += 1
        if reason == "unparseable":
            self.stats[stage].parse_failures += 1
        return {
            "instruction": text,
            "reason": reason,
            "stage": stage,
            "nearest": {"instruction": nearest[0], "score": nearest[1]} if nearest else None,
            "round": round_,
            "meta": meta,
        }


def read_keyed(run: RunDir, name: str) -> dict[str, dict[str, Any]]:
    """Records of a stage file by instruction id; the first one wins (a record is never written twice, but a
    file edited by hand or merged from two runs may repeat one)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(run / name):
        out.setdefault(rec["id"], rec)
    return out


def owned_records(ctx: RunContext, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`--shard i/N`: the records this job answers. A record a sharded bootstrap grew carries its shard and
    stays there; any other record goes to the shard its id hashes to."""
    shard = Shard.parse(getattr(ctx.cfg, "shard", None))
    if shard is None:
        return records
    spec = str(shard)
    return {
        i: rec
        for i, rec in records.items()
        if (rec.get("meta") or {}).get("shard", spec if shard.owns(i) else None) == spec
    }


class PerInstruction(abc.ABC):
    """A stage that asks the teacher one question about every kept instruction without an answer yet.

    Answers go to the stage's own file keyed by instruction id; ids already there are skipped, so the stage
    resumes. A request that failed after all retries is tried once more at the end of this session, else it is
    left for the next run (the stage then reports itself unfinished).
    """

    stage: str
    output: str  # the stage's file

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        instructions = owned_records(ctx, read_keyed(ctx.run, INSTRUCTIONS))
        done = read_keyed(ctx.run, self.output)
        self.todo = deque((i, rec["instruction"]) for i, rec in instructions.items() if i not in done)
        self.retried: set[str] = set()
        stats = ctx.stats[self.stage]
        stats.total = len(instructions)
        stats.done = len(instructions) - len(self.todo)

    @abc.abstractmethod
    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        """The request about one instruction; its tag must be `(rec_id, instruction)`."""

    @abc.abstractmethod
    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> dict[str, Any]:
        """The stage's record for one successful answer (it may also journal a rejection)."""

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        n = min(self.ctx.can_send(in_flight), len(self.todo))
        return [self.request(*self.todo.popleft()) for _ in range(n)] or None

    def satisfied(self) -> bool:
        return False  # every answer is needed

    def abandoned(self, requests: list[TeacherRequest]) -> None:
        self.ctx.stats[self.stage].requests += len(requests)

    def handle(self, responses: list[TeacherResponse]) -> None:
        results = []
        for response in responses:
            rec_id, instruction = response.request.tag
            if self.ctx.accept(self.stage, response):
                results.append(self.answer(rec_id, instruction, response))
            elif rec_id not in self.retried:
                self.retried.add(rec_id)
                self.todo.append((rec_id, instruction))
        self.ctx.stats[self.stage].done += len(results)
        self.ctx.journal.append(self.output, results)
        self.ctx.on_tick(self.stage)

    async def run(self) -> None:
        await run_stage(self.ctx, self.stage, self)
        stats = self.ctx.stats[self.stage]
        stats.finished = stats.done >= stats.total


async def run_stage(ctx: RunContext, stage: str, source: Any) -> bool:
    """Drive one teacher stage to completion (or stop); the time and CPU it took go into its stats."""
    stats = ctx.stats[stage]
    wall, cpu = time.monotonic(), time.process_time()
    try:
        if getattr(getattr(ctx.cfg, "teacher", None), "batch_api", False):
            from selfinstruct.pipeline.batch import BatchScope, run_batches

            completed = await run_batches(BatchScope.of(ctx, stage), stage, source)
        else:
            completed = await drive(ctx.teacher, source, ctx.slots, ctx.stop)
    finally:
        await ctx.journal.aflush()
        stats.elapsed_s += time.monotonic() - wall
        stats.cpu_s += time.process_time() - cpu
    if not completed:
        ctx.stop_reason = "interrupted"
    return completed


async def run_pipeline(ctx: RunContext, stages: list[str]) -> None:
    """Run the chosen stages in order; a stage that stops early (budget, Ctrl-C) stops the teacher stages
    after it, but `finetune` still rebuilds the corpus from whatever is complete."""
    from selfinstruct.pipeline import alpaca, bootstrap, classify, finetune, instances

    modules = {
        "bootstrap": bootstrap,
        "alpaca": alpaca,
        "classify": classify,
        "instances": instances,
        "finetune": finetune,
    }
    for stage in stages:
        if stage != "finetune" and ctx.stop_reason is not None:
            continue
        if stage == "finetune" and ctx.stop_reason == "interrupted":
            continue
        await modules[stage].run(ctx)
        ctx.on_tick(stage)
