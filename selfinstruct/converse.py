"""`selfinstruct converse`: grow single-turn records into multi-turn conversations (UltraChat-style).

Every input record starts one conversation. Its first user turn is the record's instruction (and input); the
first answer is the record's output (`--reuse-output`, the default) or the teacher's. Then two roles take
turns: a *user simulator* (the `converse_user` prompt: follow-up questions, clarifications, new constraints,
now and then a topic change) writes the next user message from the transcript, and the teacher answers it with
the whole conversation as context, until the conversation reaches its drawn length (uniform in `--turns`,
e.g. 2-4 exchanges). `--user-model` / `--user-base-url` give the simulator a teacher of its own.

Each generated user turn goes through, in order: `truncated`, `empty_turn`, `role_leak` (a line starting with a
role label such as "User:" or "Assistant:": the model wrote several turns), `refusal` (the simulator refused or
answered as an assistant), the heuristics of `[filters]` (word counts, blacklist, …), and `repeated_turn` (an
exact repeat, or ROUGE-L F above the novelty threshold against an earlier user turn of the same conversation).
An answer is rejected when cut off, empty or role-leaking. A rejected turn is logged to `rejected.jsonl` with
its reason and asked again (`--retries` times); then the conversation ends where it is, and is kept if it has at
least the minimum number of exchanges, else dropped (`too_few_turns`).

A conversation is appended to `conversations.jsonl` only once it is complete, so a crash or kill -9 never
leaves half a conversation; a rerun on the same `--out` continues with the records not yet finished (a
conversation under way when the run died starts over). `corpus.jsonl` (chat form: `messages` + `meta`, with
`meta.source = "converse"` and `meta.parent_id`) is rebuilt from that file at the end of every session.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from rich.console import Console

from selfinstruct.config import MaxCost, MaxRequests, MaxTokens, PromptDir, Section, save_config
from selfinstruct.corpus import corpus_path, load_corpus_any
from selfinstruct.errors import UserError
from selfinstruct.filters import FilterConfig, novelty_index
from selfinstruct.filters.heuristics import build_heuristics, normalize
from selfinstruct.generate import Monitor, open_state
from selfinstruct.pipeline import CORPUS, REJECTED, RunContext, StageStats, run_stage
from selfinstruct.pipeline.runner import Budget, Journal, NeedsEveryAnswer
from selfinstruct.pipeline.session import exit_code, teacher_session
from selfinstruct.pipeline.stage import RAW_TEXT_LIMIT
from selfinstruct.prompts import Prompts
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import CONFIG, STATE, SUMMARY
from selfinstruct.store import RunDir, atomic_write_json, atomic_write_text, read_jsonl
from selfinstruct.teachers import Teacher, TeacherConfig, make_teacher
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse, TeacherStats, Totals

CONVERSATIONS = "conversations.jsonl"
STAGE = "converse"

EMPTY_TURN = "empty_turn"
ROLE_LEAK = "role_leak"
REFUSAL = "refusal"
REPEATED_TURN = "repeated_turn"
TOO_FEW_TURNS = "too_few_turns"

_LABEL = r"[ \t]*(?:\*\*|__)?[ \t]*(user|assistant|human|gpt|system|ai)[ \t]*(?:\*\*|__)?[ \t]*:"
ROLE_LINE = re.compile(rf"^{_LABEL}", re.I | re.M)
"""A line that starts a turn of its own ("User:", "**Assistant:**", "Human:")."""

REFUSAL_RE = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a language model|i can(?:no|')t (?:help|assist|"
    r"provide|answer|comply|do that)|i'?m (?:not able|unable) to|i am (?:not able|unable) to)",
    re.I,
)
"""What a simulator writes when it refuses, or slips into the assistant's voice."""

TRANSCRIPT_ROLE = {"user": "User", "assistant": "Assistant"}


class ConverseConfig(Section):
    input: str | None = Field(
        None,
        description="records to start conversations from: a run directory or any corpus file (Alpaca, seed, chat)",
        json_schema_extra={"positional": True},
    )
    out: str = Field("outputs/converse", description="run directory (rerun the same command on it to resume)")
    turns: str = Field(
        "2-4", description="user/assistant exchanges per conversation: N or MIN-MAX (drawn uniformly)"
    )
    sample: int | None = Field(
        None, ge=1, description="start conversations from N records drawn at random (seeded)"
    )
    reuse_output: bool = Field(
        True, description="the record's output is the first answer (else, or when it is empty, the teacher's)"
    )
    retries: int = Field(2, ge=0, description="asks again after a rejected turn before the conversation ends")
    seed: int = Field(
        0, description="random seed for sampling records, drawing lengths and per-request seeds"
    )
    request_batch: int | None = Field(
        None,
        ge=1,
        description="requests per teacher call (default: 1 over HTTP, `concurrency` for --teacher vllm)",
    )
    user_temperature: float = Field(0.9, ge=0, description="temperature of the simulated user turns")
    user_max_tokens: int = Field(
        256, ge=1, description="max tokens of a user turn (a longer one is rejected)"
    )
    answer_temperature: float = Field(0.7, ge=0, description="temperature of the answers")
    answer_max_tokens: int = Field(
        1024, ge=1, description="max tokens of an answer (a longer one is rejected)"
    )
    user_model: str | None = Field(
        None,
        description="a different model for the user simulator (the rest of [teacher] applies to it too)",
    )
    user_base_url: list[str] = Field(
        [], description="endpoint(s) of the user simulator's model (default: --base-url)"
    )
    max_requests: MaxRequests = None
    max_tokens: MaxTokens = None
    max_cost: MaxCost = None
    prompt_dir: PromptDir = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher LLM")
    filters: FilterConfig = Field(
        default_factory=lambda: FilterConfig(min_words=2),
        description="heuristics on every user turn, and the ROUGE-L threshold of repeated_turn",
    )

    @field_validator("turns")
    @classmethod
    def _turn_range(cls, value: str) -> str:
        parse_turns(value)
        return value

    def bounds(self) -> tuple[int, int]:
        return parse_turns(self.turns)

    def user_teacher(self) -> TeacherConfig | None:
        """The simulator's own teacher settings, or None when it shares the teacher."""
        if self.user_model is None and not self.user_base_url:
            return None
        update: dict[str, Any] = {"model": self.user_model or self.teacher.model}
        if self.user_base_url:
            update["base_url"] = self.user_base_url
        return self.teacher.model_copy(update=update)


def parse_turns(value: str) -> tuple[int, int]:
    """`3` -> (3, 3); `2-4` -> (2, 4); at least 2 exchanges (one is what the input records already are)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    if not m:
        raise ValueError(f"expected N or MIN-MAX, got {value!r}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo < 2 or hi < lo:
        raise ValueError(f"need 2 <= MIN <= MAX exchanges, got {value!r}")
    return lo, hi


# ---------------------------------------------------------------- checking a turn


def clean_turn(text: str, role: str) -> str:
    """The turn as the role would write it: stripped, one leading label of its own role dropped ("User: …"),
    and a user message wrapped whole in quotation marks unwrapped."""
    text = text.strip()
    m = re.match(_LABEL, text, re.I)
    own = ("user", "human") if role == "user" else ("assistant", "gpt", "ai")
    if m and m.group(1).lower() in own:
        text = text[m.end() :].strip()
    if (
        role == "user"
        and len(text) > 1
        and text[0] == text[-1]
        and text[0] in "\"'“”"
        and text.count(text[0]) == 2
    ):
        text = text[1:-1].strip()
    return text


def turn_problem(text: str, role: str, truncated: bool) -> str | None:
    """The rejection reason every turn shares (user turns have more, in `UserTurnCheck`)."""
    if truncated:
        return "truncated"
    if not text:
        return EMPTY_TURN
    if ROLE_LINE.search(text):
        return ROLE_LEAK
    if role == "user" and REFUSAL_RE.search(text):
        return REFUSAL
    return None


class UserTurnCheck:
    """The heuristics of `[filters]` and novelty within the conversation, for a generated user turn."""

    def __init__(self, filters: FilterConfig):
        self.filters = filters
        self.heuristics = build_heuristics(filters.model_copy(update={"check_duplicate": False}))

    def __call__(self, text: str, earlier: Sequence[str]) -> tuple[str | None, tuple[str, float] | None]:
        """(reason or None, the nearest earlier user turn with its ROUGE-L F when it was too close)."""
        if reason := self.heuristics(text):
            return reason, None
        if normalize(text) in {normalize(t) for t in earlier}:
            return REPEATED_TURN, (text, 1.0)
        if earlier:
            result = novelty_index(self.filters, earlier).query([text], add_kept=False)[0]
            if result.max_f > self.filters.threshold:
                return REPEATED_TURN, result.nearest[0] if result.nearest else None
        return None, None


# ---------------------------------------------------------------- conversations


@dataclass
class Conversation:
    id: str
    order: int
    target: int  # exchanges wanted
    parent_id: str
    messages: list[dict[str, str]]
    reused_output: bool
    category: str | None = None  # the parent's, so `split --holdout-categories` can hold conversations out
    failures: int = 0  # rejected or failed attempts at the current step
    request_failures: int = 0  # teacher errors this session at the current step

    @property
    def turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)

    @property
    def next_role(self) -> str:
        return "assistant" if self.messages[-1]["role"] == "user" else "user"

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """The user and assistant turns as `User: …` / `Assistant: …` paragraphs (a system turn is not shown)."""
    return "\n\n".join(
        f"{TRANSCRIPT_ROLE[m['role']]}: {m['content']}" for m in messages if m["role"] in TRANSCRIPT_ROLE
    )


def draw_turns(seed: int, conv_id: str, bounds: tuple[int, int]) -> int:
    """A conversation's length: uniform in the bounds, reproducible under `--seed` whatever the arrival order."""
    return random.Random(f"{seed}:converse:{conv_id}").randint(*bounds)


def start(record: CorpusRecord, order: int, seed: int, bounds: tuple[int, int], reuse: bool) -> Conversation:
    """A conversation's opening: the record's system turn (if any), its first user turn and, reused, its answer."""
    conv_id = f"conv_{order:06d}"
    messages = record.conversation()
    first_user = next(k for k, m in enumerate(messages) if m["role"] == "user")
    opening = messages[: first_user + 1]
    reused = reuse and bool(messages[first_user + 1]["content"].strip())
    if reused:
        opening.append(messages[first_user + 1])
    parent = record.meta.get("task_id") or record.meta.get("id") or f"record_{order:06d}"
    category = record.meta.get("category")
    return Conversation(
        conv_id,
        order,
        draw_turns(seed, conv_id, bounds),
        str(parent),
        opening,
        reused,
        category and str(category),
    )


class TwoTeachers:
    """The assistant's teacher and the user simulator's seen as one teacher by `drive` and the budget: a call
    goes to the teacher of its requests' role (`Talker` never mixes roles in one call), and the request, token
    and cost totals are the sum of both."""

    def __init__(self, assistant: Teacher, user: Teacher):
        self.assistant, self.user = assistant, user
        self.model = assistant.model
        self.stats = _SummedStats(assistant, user)

    @property
    def batch_size(self) -> int:
        return self.assistant.batch_size

    @property
    def max_in_flight(self) -> int:
        return self.assistant.max_in_flight

    @property
    def honours_per_request_seed(self) -> bool:
        return self.assistant.honours_per_request_seed and self.user.honours_per_request_seed

    async def start(self) -> None:
        await self.assistant.start()
        await self.user.start()

    async def close(self) -> None:
        try:
            await self.user.close()
        finally:
            await self.assistant.close()

    async def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResponse]:
        teacher = self.user if requests[0].tag[1] == "user" else self.assistant
        return await teacher.generate(requests)


class _SummedStats:
    """Totals of several teachers read as one `Totals` (every field is the sum)."""

    def __init__(self, *teachers: Teacher):
        self._teachers = teachers

    def __getattr__(self, name: str) -> Any:
        return sum(getattr(t.stats, name) for t in self._teachers)


class Talker(NeedsEveryAnswer):
    """The `drive` source: one request per conversation at a time, the next step as soon as the last one is in."""

    def __init__(self, ctx: RunContext, conversations: list[Conversation]):
        cfg: ConverseConfig = ctx.cfg  # type: ignore[assignment]
        self.ctx, self.cfg = ctx, cfg
        self.min_turns = cfg.bounds()[0]
        self.templates = {role: ctx.prompts.get(f"converse_{role}") for role in ("user", "assistant")}
        self.check = UserTurnCheck(cfg.filters)
        self.ready: deque[Conversation] = deque(conversations)
        self.kept_out: list[dict[str, Any]] = []
        self.rejected_out: list[dict[str, Any]] = []
        self.user_model = (cfg.user_teacher() or cfg.teacher).model

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        if not self.ready:
            return None
        n = min(self.ctx.can_send(in_flight), len(self.ready))
        role = self.ready[0].next_role  # one role per call: the two roles may have different teachers
        batch, skipped = [], []
        while self.ready and len(batch) < n:
            conv = self.ready.popleft()
            (batch if conv.next_role == role else skipped).append(conv)
        self.ready.extendleft(reversed(skipped))
        return [self._request(c) for c in batch] or None

    def _request(self, conv: Conversation) -> TeacherRequest:
        role, ctx = conv.next_role, self.ctx
        key = (conv.id, len(conv.messages), conv.failures)
        if role == "user":
            messages, prompt = self.templates["user"].render(
                conversation=transcript(conv.messages), turn=conv.turns + 1
            )
            stop = None if ctx.chat else ["\nAssistant:", "\nUser:"]
            sampling = ctx.sampling("user", key, **({"stop": stop} if stop else {}))
        else:
            history, last = conv.messages[:-1], conv.messages[-1]["content"]
            messages, prompt = self.templates["assistant"].render(
                conversation=transcript(conv.messages), message=last
            )
            if (
                messages is not None
            ):  # the real conversation, with the template's system turn unless it has one
                own_system = [m for m in history if m["role"] == "system"]
                template_system = [m for m in messages if m["role"] == "system"]
                turns = [m for m in history if m["role"] != "system"]
                messages = (own_system or template_system) + turns + messages[-1:]
            sampling = ctx.sampling("assistant", key, **({} if ctx.chat else {"stop": ["\nUser:"]}))
        return TeacherRequest(messages=messages, prompt=prompt, sampling=sampling, tag=(conv, role))

    def handle(self, responses: list[TeacherResponse]) -> None:
        for response in responses:
            conv, role = response.request.tag
            if not self.ctx.accept(STAGE, response):
                conv.request_failures += 1
                if conv.request_failures <= 1:
                    self.ready.append(conv)  # once more this session; after that the next run starts it over
                continue
            conv.request_failures = 0
            choice = response.choices[0] if response.choices else None
            text = clean_turn(choice.text if choice else "", role)
            truncated = choice is not None and choice.finish_reason == "length"
            reason, nearest = turn_problem(text, role, truncated), None
            if reason is None and role == "user":
                reason, nearest = self.check(text, conv.user_turns())
            if reason is not None:
                self._reject_turn(conv, role, text, reason, nearest)
            else:
                conv.failures = 0
                conv.messages.append({"role": role, "content": text})
                if role == "assistant" and conv.turns >= conv.target:
                    self._finish(conv, None)
                else:
                    self.ready.append(conv)
        self.ctx.journal.append(REJECTED, self.rejected_out)
        self.ctx.journal.append(CONVERSATIONS, self.kept_out)
        self.kept_out, self.rejected_out = [], []
        self.ctx.on_tick(STAGE)

    def _reject_turn(
        self, conv: Conversation, role: str, text: str, reason: str, nearest: tuple[str, float] | None
    ) -> None:
        rec = self.ctx.reject_record(
            STAGE,
            text[:RAW_TEXT_LIMIT],
            reason,
            conv.turns + (role == "user"),
            nearest,
            id=conv.id,
            role=role,
        )
        self.rejected_out.append(rec)
        conv.failures += 1
        if conv.failures <= self.cfg.retries:
            self.ready.append(conv)
        else:
            self._finish(conv, reason)

    def _finish(self, conv: Conversation, ended_by: str | None) -> None:
        """Keep the conversation (cut back to its last answer) or, too short, drop it; either way it is done."""
        if conv.messages[-1]["role"] == "user":
            conv.messages.pop()
        stats = self.ctx.stats[STAGE]
        stats.done += 1
        if conv.turns < self.min_turns:
            rec = self.ctx.reject_record(
                STAGE,
                conv.messages[0]["content"][:RAW_TEXT_LIMIT],
                TOO_FEW_TURNS,
                conv.turns,
                id=conv.id,
                ended_by=ended_by,
            )
            rec["stage"] = "conversation"
            self.rejected_out.append(rec)
            return
        meta = {
            "source": "converse",
            "parent_id": conv.parent_id,
            "task_id": conv.id,
            "turns": conv.turns,
            "target_turns": conv.target,
            "reused_output": conv.reused_output,
            "teacher_model": self.cfg.teacher.model,
            "user_model": self.user_model,
        }
        if conv.category:
            meta["category"] = conv.category
        if ended_by:
            meta["ended_by"] = ended_by
        self.kept_out.append({"id": conv.id, "messages": conv.messages, "meta": meta})


# ---------------------------------------------------------------- the run directory


def _mismatch(run: RunDir, identity: dict[str, Any]) -> Callable[[dict[str, Any]], str | None]:
    def check(old: dict[str, Any]) -> str | None:
        if old.get("command") != "converse":
            return f"{run.path} is not a converse run; use another --out"
        same = ("input_sha256", "records", "turns", "sample", "seed")
        if any(old.get(k) != identity[k] for k in same):
            return (
                f"{run.path} holds conversations of other records or settings ({old.get('input')}, "
                f"{old.get('records')} records, --turns {old.get('turns')}); use the same INPUT, --turns, "
                "--sample and --seed to resume, or another --out"
            )
        return None

    return check


def finished_ids(run: RunDir) -> tuple[set[str], Counter[str]]:
    """Conversations already decided (kept, or dropped as too short), and the rejections so far by reason."""
    done = {rec["id"] for rec in read_jsonl(run / CONVERSATIONS)}
    reasons: Counter[str] = Counter()
    for rec in read_jsonl(run / REJECTED):
        reasons[rec.get("reason", "?")] += 1
        if rec.get("stage") == "conversation":
            done.add(rec["meta"]["id"])
    return done, reasons


def write_corpus(run: RunDir) -> list[dict[str, Any]]:
    """corpus.jsonl = every kept conversation in chat form, in input order, replaced atomically."""
    kept = sorted(read_jsonl(run / CONVERSATIONS), key=lambda r: r["id"])
    records = [{"messages": r["messages"], "meta": r["meta"]} for r in kept]
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    atomic_write_text(run / CORPUS, text)
    return records


# ---------------------------------------------------------------- progress and summary


class ConverseMonitor(Monitor):
    """generate's progress display with converse's summary."""

    def __init__(self, ctx: RunContext, state: dict[str, Any], console: Console, total: int):
        super().__init__(ctx, state, console)
        self.total = total
        self.corpus: list[dict[str, Any]] = []

    def summary(self, final: bool) -> dict[str, Any]:
        ctx = self.ctx
        cfg: ConverseConfig = ctx.cfg  # type: ignore[assignment]
        usage, s = ctx.budget.total(), ctx.stats[STAGE]
        turns = Counter(r["meta"]["turns"] for r in self.corpus)
        return {
            "pipeline": "converse",
            "teacher_model": cfg.teacher.model,
            "user_model": (cfg.user_teacher() or cfg.teacher).model,
            "input": cfg.input,
            "records": self.total,
            "turns": cfg.turns,
            "decided": s.done,
            "kept": len(self.corpus),
            "dropped": s.rejected.get(TOO_FEW_TURNS, 0),
            "turns_histogram": {str(k): turns[k] for k in sorted(turns)},
            "rejected_by_reason": dict(s.rejected.most_common()),
            "requests": usage.requests,
            "failed_requests": usage.failed_requests,
            "retries": usage.retries,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": round(usage.cost, 6),
            "elapsed_s": self.elapsed(),
            "corpus_records": len(self.corpus),
            "stages": {STAGE: s.to_dict()},
            "finished": final and s.done >= self.total,
            "stop_reason": ctx.stop_reason,
            "sessions": self.state.get("sessions", 1),
        }

    def print_final(self, summary: dict[str, Any], run: RunDir) -> None:
        c = self.console
        status = "finished" if summary["finished"] else f"stopped ({summary['stop_reason'] or 'incomplete'})"
        c.print(
            f"\nconverse {status}: {summary['decided']} / {summary['records']} conversations", markup=False
        )
        turns = ", ".join(f"{k} turns: {n}" for k, n in summary["turns_histogram"].items()) or "none"
        c.print(f"  kept          {summary['kept']} ({turns}), dropped {summary['dropped']}", markup=False)
        if summary["rejected_by_reason"]:
            reasons = ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items())
            c.print(f"  rejected      {reasons}", highlight=False, markup=False)
        c.print(
            f"  teacher       {summary['requests']} requests ({summary['failed_requests']} failed), "
            f"{summary['prompt_tokens'] + summary['completion_tokens']:,} tokens, ${summary['cost']:.4f}, "
            f"{summary['elapsed_s']:.1f} s",
            markup=False,
        )
        for name in (CONVERSATIONS, REJECTED, CORPUS, SUMMARY):
            if (run / name).exists():
                c.print(f"  {name:<20} {run / name}", highlight=False, markup=False)
        if not summary["finished"]:
            c.print("  rerun the same command to continue", markup=False)


# ---------------------------------------------------------------- the command


def load_input(cfg: ConverseConfig) -> tuple[list[tuple[int, CorpusRecord]], Path]:
    """(input position, record) of the records to start from, and the file they came from."""
    if not cfg.input:
        raise UserError("converse needs an INPUT: a run directory or a corpus file")
    source = corpus_path(cfg.input)
    records = list(enumerate(load_corpus_any(source)))
    if cfg.sample is not None and cfg.sample < len(records):
        picked = sorted(random.Random(f"{cfg.seed}:converse-sample").sample(range(len(records)), cfg.sample))
        records = [records[k] for k in picked]
    return records, source


def run_converse(
    cfg: ConverseConfig,
    *,
    teacher: Teacher | None = None,
    user_teacher: Teacher | None = None,
    console: Console | None = None,
) -> int:
    """Grow (or resume growing) `cfg.input` into conversations in `cfg.out`. `teacher` / `user_teacher`: already
    started teachers (tests). Returns 0 when finished or stopped by a budget cap, 130 after Ctrl-C, 143 after SIGTERM."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    bounds = cfg.bounds()
    records, source = load_input(cfg)
    prompts = Prompts("chat" if cfg.teacher.api == "chat" else "completion", cfg.prompt_dir)
    for role in ("user", "assistant"):  # a bad template fails before any request
        prompts.get(f"converse_{role}")
    identity = {
        "command": "converse",
        "input": str(source),
        "input_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "records": len(records),
        "turns": f"{bounds[0]}-{bounds[1]}",
        "sample": cfg.sample,
        "seed": cfg.seed,
    }
    with RunDir(cfg.out) as run:
        if run.path.resolve() == source.parent.resolve() and source.name == CORPUS:
            raise UserError(f"{run.path}: --out must not be the input run directory")
        state = open_state(run, identity, "a converse run", _mismatch(run, identity))
        state["sessions"] = state.get("sessions", 0) + 1
        atomic_write_json(run / STATE, state)
        save_config("converse", cfg, run / CONFIG)
        done, reasons = finished_ids(run)
        conversations = [start(r, k, cfg.seed, bounds, cfg.reuse_output) for k, r in records]
        todo = [c for c in conversations if c.id not in done]
        the_teacher: Any = None
        own = teacher is None and bool(todo)
        if todo:
            main = teacher or make_teacher(cfg.teacher)
            user_cfg = cfg.user_teacher()
            user = user_teacher or (make_teacher(user_cfg) if user_cfg is not None and own else None)
            the_teacher = TwoTeachers(main, user) if user is not None else main
        teacher_stats = the_teacher.stats if the_teacher is not None else TeacherStats()
        journal = Journal(run, (CONVERSATIONS, REJECTED))
        stats = {STAGE: StageStats(total=len(conversations), done=len(conversations) - len(todo))}
        stats[STAGE].rejected.update(reasons)
        ctx = RunContext(
            cfg=cfg,  # type: ignore[arg-type]  # the fields RunContext reads are the same as generate's
            run=run,
            seeds=[],
            teacher=the_teacher,
            prompts=prompts,
            journal=journal,
            budget=Budget(
                cfg.max_requests,
                cfg.max_tokens,
                cfg.max_cost,
                earlier=Totals(**state.get("usage", {})),
                stats=teacher_stats,  # type: ignore[arg-type]  # a summed view of two teachers' totals
                at_start=Totals.of(teacher_stats),  # type: ignore[arg-type]
            ),
            decoding={
                "user": {
                    "temperature": cfg.user_temperature,
                    "top_p": 1.0,
                    "max_tokens": cfg.user_max_tokens,
                },
                "assistant": {
                    "temperature": cfg.answer_temperature,
                    "top_p": 1.0,
                    "max_tokens": cfg.answer_max_tokens,
                },
            },
            stats=stats,
        )
        monitor = ConverseMonitor(ctx, state, console, len(conversations))
        ctx.on_tick = monitor.tick
        try:
            if todo:
                with monitor:
                    asyncio.run(_session(ctx, Talker(ctx, todo), own, console))
            stats[STAGE].finished = stats[STAGE].done >= len(conversations)
        finally:
            journal.close()
            monitor.corpus = write_corpus(run)
            summary = monitor.write_final(run)
        monitor.print_final(summary, run)
    return exit_code(ctx)


async def _session(ctx: RunContext, talker: Talker, own_teacher: bool, console: Console) -> None:
    """Start the teacher(s), run the conversations, stop cleanly on the first Ctrl-C or SIGTERM."""
    async with teacher_session(ctx, own_teacher, console):
        await run_stage(ctx, STAGE, talker)
