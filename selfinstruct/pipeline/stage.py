"""What every pipeline stage builds on: the stage declaration, the shared run context, and the two shapes of
teacher-driven stage (`Growing`: grow a pool of instructions to a target; `PerInstruction`: one answer per kept
instruction).

A stage is one module that defines a `Stage` (its name, prompt templates with their placeholders, decoding
presets, the run-directory file it writes, and its `run` coroutine) and is listed in `pipeline/registry.py`.
Nothing here knows which stages exist, so this module imports no stage and no command.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.filters import TOO_SIMILAR, CandidateFilter, Decision
from selfinstruct.pipeline.runner import Budget, Journal, drive
from selfinstruct.prompts import Prompts, declare_template
from selfinstruct.records import Instance, SeedTask
from selfinstruct.rundir import INSTRUCTIONS, REJECTED, KeptRecord, RejectedRecord
from selfinstruct.shard import Shard
from selfinstruct.store import RunDir, read_jsonl
from selfinstruct.teachers.base import Sampling, Teacher, TeacherRequest, TeacherResponse

MAX_FAILURES_IN_A_ROW = 20
"""Answers that failed after all retries, in a row, before the run gives up (e.g. every request gets a 400)."""

RAW_TEXT_LIMIT = 2000
"""Characters of an unreadable or truncated completion kept in rejected.jsonl (enough to see what went wrong)."""


def head_and_tail(text: str, limit: int = RAW_TEXT_LIMIT) -> str:
    """`text` cut to about `limit` characters for rejected.jsonl, keeping both ends: the start says what the
    answer was about, the end whether a cut-off one was looping or merely long."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[… {len(text) - 2 * half} characters left out …]\n{text[-half:]}"


DECODING_KEYS = ("temperature", "top_p", "presence_penalty", "max_tokens")
"""The decoding settings a stage declares per preset and a user can override per stage."""


@dataclass(frozen=True)
class TemplateVars:
    """The placeholders a stage provides to one of its templates, and those a template must use.

    `styles`: the prompt styles the template exists in (a chat-only template has no raw-text file).
    """

    provides: frozenset[str]
    requires: frozenset[str]
    styles: frozenset[str] = frozenset({"chat", "completion"})


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, as the registry, the `generate` command and the progress display see it.

    `templates`: prompt template names (`<name>.chat.txt` / `<name>.completion.txt`) with their placeholders;
    they are checked before any request is sent, and requests rendered from them carry the name as their
    `marker`. `decoding`: per preset (`reference`, `chat`) the values of `DECODING_KEYS`; a stage without it
    sends no requests (it still runs after a budget cap stopped the teacher stages, but not after Ctrl-C).
    `output`: the run-directory file the stage writes, `record` the type of one of its lines (a `rundir`
    TypedDict; tests check the files against it). `grows`: the stage's progress counts kept
    instructions towards `--num-instructions` (the first stage of a pipeline).
    """

    name: str
    run: Callable[[RunContext], Awaitable[None]]
    templates: Mapping[str, TemplateVars] = field(default_factory=dict)
    decoding: Mapping[str, Mapping[str, Any]] | None = None
    output: str | None = None
    record: type | None = None
    grows: bool = False

    def __post_init__(self) -> None:
        for name, v in self.templates.items():
            declare_template(name, v.provides, v.requires)
        for preset, values in (self.decoding or {}).items():
            if set(values) != set(DECODING_KEYS):
                raise ValueError(f"stage {self.name}: decoding preset {preset} must set {DECODING_KEYS}")

    @property
    def uses_teacher(self) -> bool:
        return self.decoding is not None


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

    cfg: Any  # the command's settings (GenerateConfig, EvolveConfig, …): each stage reads its own fields
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
    pipeline: tuple[Stage, ...] = ()  # the whole pipeline being run (also the stages not chosen this time)
    signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    state: dict[str, Any] = field(default_factory=dict)  # the run's state.json, kept across sessions
    save_state: Callable[[], None] = lambda: None  # write `state` (through the journal, after what it holds)
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
        """The stage's decoding, `extra` added or overriding. A teacher that honours per-request seeds also gets
        one, derived from `--seed` and a request key, so a rerun asks the same questions with the same seeds."""
        values = {**self.decoding[stage], **extra}
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
    ) -> RejectedRecord:
        self.stats[stage].rejected[reason] += 1
        if reason == "unparseable":
            self.stats[stage].parse_failures += 1
        return RejectedRecord(
            instruction=text,
            reason=reason,
            stage=stage,
            nearest={"instruction": nearest[0], "score": nearest[1]} if nearest else None,
            round=round_,
            meta=meta,
        )


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


# ---------------------------------------------------------------- growing a pool of instructions


@dataclass
class Candidate:
    instruction: str
    instance: Instance | None = None  # the Alpaca pipeline's task comes with its input/output
    meta: dict[str, Any] = field(default_factory=dict)  # what a rejected record should show besides the text


class Keeper:
    """The pool (seeds + kept instructions) and the filters every candidate instruction passes, in order.

    On start it re-reads `instructions.jsonl`, so a resumed run filters against exactly what is on disk. Kept
    and rejected records go to the journal at once; summary.json is written through the same journal after
    them, so it never counts a record that is not on disk yet.
    """

    def __init__(self, ctx: RunContext, stage: str):
        self.ctx, self.stage = ctx, stage
        self.kept: list[tuple[str, str]] = []  # (id, instruction) of machine instructions, in file order
        self.max_round = -1
        seen: set[str] = set()
        for rec in read_jsonl(ctx.run / INSTRUCTIONS):
            if rec["id"] not in seen:
                seen.add(rec["id"])
                self.kept.append((rec["id"], rec["instruction"]))
                self.max_round = max(self.max_round, rec.get("round", 0))
        pool = [s.instruction for s in ctx.seeds] + [text for _, text in self.kept]
        # a shard's ids must not collide with another shard's when `merge` joins them
        self.shard = Shard.parse(getattr(ctx.cfg, "shard", None))
        self.id_prefix = f"gen_s{self.shard.index}_" if self.shard else "gen_"
        self.filter = CandidateFilter(ctx.cfg.filters, pool=pool)

    @property
    def count(self) -> int:
        return len(self.kept)

    def offer(self, candidates: list[Candidate], round_: int, meta: dict[str, Any], limit: int) -> int:
        """Filter candidates in order, journal kept and rejected ones; keep at most up to `limit` in the pool.

        Returns how many were kept.
        """
        ctx, stats = self.ctx, self.ctx.stats[self.stage]
        why = {"prompt_hash": meta.get("prompt_hash")}
        rejected: list[RejectedRecord] = []
        kept_records: list[KeptRecord] = []
        room = limit - self.count
        # Near the target judge one at a time, so no instruction joins the pool that is not written.
        groups = [candidates] if len(candidates) <= room else [[c] for c in candidates]
        for group in groups:
            if self.count >= limit:
                break
            decisions = self.filter([c.instruction for c in group])
            for cand, decision in zip(group, decisions, strict=True):
                if decision.keep:
                    kept_records.append(self._keep(cand, decision, round_, meta))
                    continue
                nearest = decision.nearest[0] if decision.reason == TOO_SIMILAR and decision.nearest else None
                rejected.append(
                    ctx.reject_record(
                        self.stage,
                        cand.instruction,
                        decision.reason or "?",
                        round_,
                        nearest,
                        **why,
                        **cand.meta,
                    )
                )
        stats.candidates += len(rejected) + len(kept_records)
        stats.done = self.count
        ctx.journal.append(REJECTED, rejected)
        ctx.journal.append(INSTRUCTIONS, kept_records)
        return len(kept_records)

    def _keep(self, cand: Candidate, decision: Decision, round_: int, meta: dict[str, Any]) -> KeptRecord:
        rec_id = f"{self.id_prefix}{self.count:06d}"
        self.kept.append((rec_id, cand.instruction))
        # A plain dict (KeptRecord), not `InstructionRecord.to_dict()`: `dataclasses.asdict` deep-copies
        # recursively and cost more than filtering the candidate.
        return KeptRecord(
            id=rec_id,
            instruction=cand.instruction,
            round=round_,
            origin="machine",
            is_classification=None,
            instances=[]
            if cand.instance is None
            else [{"input": cand.instance.input, "output": cand.instance.output}],
            most_similar=dict(decision.nearest),
            avg_similarity=decision.mean_f,
            meta=meta if self.shard is None else {**meta, "shard": str(self.shard)},
        )

    def unreadable(self, text: str, reason: str, round_: int, count: int = 1, **meta: Any) -> None:
        """Journal a completion (or `count` pieces of one) that yielded nothing usable."""
        text = text[:RAW_TEXT_LIMIT]
        records = [self.ctx.reject_record(self.stage, text, reason, round_, **meta) for _ in range(count)]
        self.ctx.journal.append(REJECTED, records)


def numbered(texts: Iterable[str]) -> str:
    """A numbered list, one item per line, as a base model continues it and a chat prompt shows it."""
    return "\n".join(f"{n}. {text}" for n, text in enumerate(texts, start=1))


def prompt_hash(messages: list[dict[str, str]] | None, prompt: str | None) -> str:
    text = prompt if prompt is not None else "\n".join(m["content"] for m in messages or [])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


MIN_IN_FLIGHT = 4
"""Requests kept in flight however few instructions are still wanted (unless --concurrency is lower)."""
PRIOR_ANSWERS = 2
"""How many answers' worth of weight the prior yield has against the yield observed in this session."""


class Growing(abc.ABC):
    """What the bootstrap and the Alpaca stage share: the pool, rounds, pacing and patience.

    A round is one teacher call (`request_batch` prompts built from the same pool snapshot). Requests in flight
    are sized to the need: the instructions still wanted divided by the expected yield (kept per answer), at
    least `MIN_IN_FLIGHT` and at most the teacher's `max_in_flight` (`--concurrency`). Before any answer the
    expected yield is a prior of half the items asked per prompt, so a small target starts with a few requests
    (a first answer soon, on a slow teacher) rather than a window of hundreds; the observed yield takes over
    as answers come in. `patience` answers in a row without a kept instruction stop the stage (a teacher that
    only repeats itself).
    """

    stage: str

    @property
    @abc.abstractmethod
    def asked_per_prompt(self) -> int:
        """How many instructions one prompt asks for."""

    def __init__(self, ctx: RunContext):
        cfg = ctx.cfg
        self.ctx = ctx
        self.keeper = Keeper(ctx, self.stage)
        # `--shard i/N`: prompts show only this shard's seeds, so N jobs grow N independent pools
        shard = self.keeper.shard
        self.seeds = ctx.seeds if shard is None else shard.select(ctx.seeds, key=lambda s: s.id)
        if not self.seeds:
            raise UserError(f"--shard {shard}: no seed task falls into this shard; use fewer shards")
        self.template = ctx.prompts.get(self.stage)
        self.rng = random.Random(f"{cfg.seed}:{self.stage}:{self.keeper.count}")
        self.target = cfg.num_instructions
        self.round = self.keeper.max_round + 1
        self.answered = self.kept_now = self.idle = 0
        stats = ctx.stats[self.stage]
        stats.total, stats.done = self.target, self.keeper.count

    @abc.abstractmethod
    def request(self, round_: int, k: int) -> TeacherRequest:
        """The k-th prompt of a round."""

    @abc.abstractmethod
    def answer(self, response: TeacherResponse) -> int:
        """Parse and filter one successful answer; return how many instructions it added."""

    def wanted_in_flight(self, remaining: int) -> int:
        """Requests worth having in flight to keep `remaining` more instructions coming."""
        prior = self.asked_per_prompt / 2
        expected = (self.kept_now + PRIOR_ANSWERS * prior) / (self.answered + PRIOR_ANSWERS)
        ceiling = self.ctx.teacher.max_in_flight
        return min(ceiling, max(MIN_IN_FLIGHT, math.ceil(remaining / expected)))

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        remaining = self.target - self.keeper.count
        if remaining <= 0 or self.idle >= self.ctx.cfg.patience:
            return None
        n = min(self.ctx.can_send(in_flight), self.wanted_in_flight(remaining) - in_flight)
        if n <= 0:
            return None
        batch = [self.request(self.round, k) for k in range(n)]
        self.round += 1
        return batch

    def satisfied(self) -> bool:
        return self.keeper.count >= self.target

    def other_seeds(self, k: int, taken: set[str]) -> list[SeedTask]:
        """A uniform sample of up to `k` seeds whose id is not in `taken` (those the prompt already shows).

        Drawing k + |taken| seeds and skipping the taken ones never lists every seed: a demo per request
        stays O(k) with a pool of 50k seeds (listing them cost 130 ms per request there)."""
        draw = self.rng.sample(self.seeds, min(len(self.seeds), k + len(taken)))
        return [s for s in draw if s.id not in taken][:k]

    def abandoned(self, requests: list[TeacherRequest]) -> None:
        self.ctx.stats[self.stage].requests += len(requests)

    def handle(self, responses: list[TeacherResponse]) -> None:
        for response in responses:
            if self.ctx.accept(self.stage, response):
                kept = self.answer(response)
                self.answered += 1
                self.kept_now += kept
                self.idle = 0 if kept else self.idle + 1
        self.ctx.on_tick(self.stage)

    async def run(self) -> None:
        await run_stage(self.ctx, self.stage, self)
        stats = self.ctx.stats[self.stage]
        stats.done = self.keeper.count
        stats.finished = self.keeper.count >= self.target
        if self.idle >= self.ctx.cfg.patience:
            stats.extra["stopped"] = "no_progress"

    def provenance(self, tag: dict[str, Any]) -> dict[str, Any]:
        """The `meta` of a kept record: who wrote it from which prompt."""
        return {
            "teacher_model": self.ctx.teacher.model,
            "pipeline": self.ctx.cfg.pipeline,
            **{k: v for k, v in tag.items() if k != "round"},
        }
