"""`selfinstruct evolve`: WizardLM's Evol-Instruct, with the paper's elimination of failed evolutions.

Every input record starts a lineage. In each round its latest surviving version is rewritten by the teacher with
one operation drawn uniformly from `--ops` (five in-depth ones that make it harder, `breadth` that writes a new
task of the same domain), then the rewrite goes through the eliminations, cheapest first:

* unreadable or cut-off rewrite: `unparseable`, `truncated`;
* `evol_prompt_leak`: it copies words of the evolving prompt ("original task", "given prompt", …);
* `evol_equal`: an exact copy of its parent, or the teacher judges it equal (no information added);
* the usual filters of `generate`: heuristics, then exact ROUGE-L novelty against everything kept so far. An
  in-depth rewrite keeps most of its parent's words by design, so it is compared against everything except its
  own lineage (whether it adds anything is the judge's call); a breadth rewrite is compared against all of it;
* after the teacher answered it: `evol_sorry_short` (the answer says "sorry" in under `--sorry-words` words),
  `evol_stopwords_only` (only punctuation and stop words), `truncated` (cut off by max tokens).

A survivor goes to `evolved.jsonl` and becomes the parent of the lineage's next round; a failure is logged to
`rejected.jsonl` with its reason and the lineage retries from the same parent next round. Rounds are per lineage:
a record starts its next round as soon as its previous one is decided, so the teacher never idles at a round
boundary. Exactly one line (survivor or rejection) is written per (lineage, round), and a lineage's next round
starts only once that line is on disk, so state is derived from the two files after a crash or kill -9.

A request's tag is plain data (lineage, round, step, and the rewrite being judged or answered), so a Batch API
job (`--batch-api`) still running when the process died is polled again by the rerun and its answers carry the
attempts on from where they were: nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import random
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from rapidfuzz.distance import LCSseq
from rich.console import Console
from rich.text import Text

from selfinstruct.config import MaxCost, MaxRequests, MaxTokens, PromptDir, Section, save_config
from selfinstruct.corpus import load_alpaca, load_corpus_any
from selfinstruct.errors import UserError
from selfinstruct.filters import TOO_SIMILAR, FilterConfig, novelty_index
from selfinstruct.filters.heuristics import build_heuristics, normalize
from selfinstruct.filters.rouge import rouge_fmeasure
from selfinstruct.generate import Monitor, open_state
from selfinstruct.parsing import _clean_input, _json_values, _object, _text, _unfence, collapse, parse_yes_no
from selfinstruct.pipeline.runner import Budget, Journal, NeedsEveryAnswer
from selfinstruct.pipeline.session import exit_code, teacher_session
from selfinstruct.pipeline.stage import RAW_TEXT_LIMIT, RunContext, StageStats, run_stage
from selfinstruct.prompts import Prompts
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import CONFIG, CORPUS, REJECTED, STATE, SUMMARY
from selfinstruct.shard import Shard, ShardSpec, shard_field
from selfinstruct.store import RunDir, atomic_write_json, atomic_write_text, read_jsonl
from selfinstruct.teachers import Teacher, TeacherConfig, make_teacher
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse, TeacherStats

OPS = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")
"""In-depth operations (the paper's five; `complicate_input` is in the paper, not in its released code), then
in-breadth evolving."""

EVOLVED = "evolved.jsonl"

EVOL_EQUAL = "evol_equal"
EVOL_SORRY_SHORT = "evol_sorry_short"
EVOL_STOPWORDS_ONLY = "evol_stopwords_only"
EVOL_PROMPT_LEAK = "evol_prompt_leak"

LEAK_PHRASES = (
    "original task", "rewritten task", "given task", "new task:", "given prompt", "rewritten prompt",
    "created prompt", "#given", "#rewritten", "#created",
)  # fmt: skip
"""Words of the evolving prompts (ours and the reference's) that have no business in a task."""

STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been before being below
    between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
    few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
    him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
    mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
    she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
    there there's these they they'd they'll they're they've this those through to too under until up very was
    wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
    whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
    """.split()
)
"""English function words: an answer made only of these (and punctuation) says nothing."""

# Decoding: the rewrite samples like the reference (a chat model at temperature 1), the judge is greedy.
DECODING: dict[str, dict[str, Any]] = {
    "evolve": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1024},
    "judge": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16},
    "answer": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 1024},
}


class EvolveConfig(Section):
    input: str | None = Field(
        None,
        description="the corpus to evolve: a run directory (its corpus.jsonl), Alpaca JSON/JSONL or seed JSONL",
        json_schema_extra={"positional": True},
    )
    out: str = Field("outputs/evolve", description="run directory (rerun the same command on it to resume)")
    rounds: int = Field(4, ge=0, description="evolution rounds per record (WizardLM: 4)")
    ops: list[str] = Field([], description=f"operations to draw from (default all: {','.join(OPS)})")
    answer: bool = Field(True, description="have the teacher answer every evolved instruction")
    judge_equal: Literal["teacher", "off"] = Field(
        "teacher", description="ask the teacher whether a rewrite adds nothing over its parent (evol_equal)"
    )
    max_records: int | None = Field(None, ge=1, description="evolve only the first N input records")
    include_originals: bool = Field(True, description="put the input records into corpus.jsonl too")
    seed: int = Field(0, description="random seed for drawing operations and per-request teacher seeds")
    request_batch: int | None = Field(
        None,
        ge=1,
        description="requests per teacher call (default: 1 over HTTP, `concurrency` for --teacher vllm)",
    )
    evolve_temperature: float = Field(1.0, ge=0, description="temperature of the rewrites")
    evolve_max_tokens: int = Field(1024, ge=1, description="max tokens of a rewrite")
    judge_max_tokens: int = Field(16, ge=1, description="max tokens of the equality judge's answer")
    answer_temperature: float = Field(0.7, ge=0, description="temperature of the answers")
    answer_max_tokens: int = Field(
        1024, ge=1, description="max tokens of an answer (a cut-off one is dropped)"
    )
    sorry_words: int = Field(
        80, ge=1, description="evol_sorry_short: an answer containing 'sorry' with fewer words is eliminated"
    )
    leak_phrases: list[str] = Field(
        list(LEAK_PHRASES), description="evol_prompt_leak: phrases (any case) a rewrite may not contain"
    )
    schema_max_chars: int | None = Field(
        None, ge=1, description="structured output: longest string allowed in the JSON rewrite (maxLength)"
    )
    max_requests: MaxRequests = None
    max_tokens: MaxTokens = None
    max_cost: MaxCost = None
    prompt_dir: PromptDir = None
    shard: ShardSpec = shard_field("lineages (input records, by root id) to evolve")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher LLM")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="heuristic and novelty filters")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: list[str]) -> list[str]:
        for op in ops:
            if op not in OPS:
                raise ValueError(f"unknown operation '{op}' (known: {', '.join(OPS)})")
        return ops

    def chosen_ops(self) -> list[str]:
        return [op for op in OPS if not self.ops or op in self.ops]


# ---------------------------------------------------------------- parsing the teacher's answers


def evolved_schema(max_chars: int | None) -> dict[str, Any]:
    """`{"instruction": ..., "input": ...}`: the rewritten task ("" input when it needs none)."""
    return _object({"instruction": _text(max_chars), "input": _text(max_chars)})


JUDGE_SCHEMA: dict[str, Any] = _object({"equal": {"type": "boolean"}})

_LABEL = re.compile(
    r"^[ \t]*(?:[#>*_-]+[ \t]*)?(?:\*\*|__)?[ \t]*(instruction|input)[ \t]*(?:\*\*|__)?[ \t]*:"
    r"(?:[ \t]*(?:\*\*|__))?[ \t]*",
    re.I | re.M,
)


def _input(value: str) -> str:
    """An input as given; "" for the ways models say there is none, and for one without a letter or digit."""
    value = _clean_input(value)
    if value.lower() in ("none", "null", "n/a", "no input") or not any(c.isalnum() for c in value):
        return ""
    return value


def parse_evolved(text: str, default_input: str) -> tuple[str, str] | None:
    """(instruction, input) from JSON or `Instruction:`/`Input:` lines, else the whole text as the instruction.

    An answer without an input keeps `default_input` (the parent's for an in-depth rewrite, none for breadth);
    None when there is no instruction or the JSON is broken.
    """
    body = _unfence(text)
    value, ok = _json_values(body)
    if not ok and body.lstrip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):  # raw control characters inside strings
            value, ok = json.JSONDecoder(strict=False).raw_decode(body.lstrip())[0], True
    if ok or body.lstrip().startswith(("{", "[")):
        if not isinstance(value, dict) or not isinstance(value.get("instruction"), str):
            return None
        instruction, given = collapse(value["instruction"]), value.get("input")
        return (
            (instruction, _input(given) if isinstance(given, str) else default_input) if instruction else None
        )
    fields: dict[str, str] = {}
    marks = list(_LABEL.finditer(body))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        fields.setdefault(m.group(1).lower(), body[m.end() : end].strip())
    instruction = collapse(fields.get("instruction", "") if marks else body)
    if not instruction:
        return None
    return instruction, _input(fields["input"]) if "input" in fields else default_input


_EQUAL_WORD = re.compile(r"\b(not\s+equal|unequal|different|equal|same|identical)\b", re.I)


def parse_judge(text: str) -> bool | None:
    """True when the judge says the two tasks are equal: `{"equal": bool}`, yes/no, or "equal"/"not equal"."""
    verdict = parse_yes_no(text)
    if verdict is None and (m := _EQUAL_WORD.search(text)):
        verdict = m.group(1).lower() in ("equal", "same", "identical")
    return verdict


def sorry_short(answer: str, max_words: int) -> bool:
    return re.search(r"\bsorry\b", answer, re.I) is not None and len(answer.split()) < max_words


def stopwords_only(answer: str) -> bool:
    """Nothing but punctuation and stop words (an empty answer included)."""
    return all(w in STOPWORDS for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", answer.lower().replace("’", "'")))


def _record_key(instruction: str, input_: str) -> str:
    """Two records are the same when instruction and input are, ignoring case and spacing."""
    return normalize(f"{instruction}\n{input_}")


def format_task(instruction: str, input_: str) -> str:
    """A task as the evolving and judging prompts show it (and a base model continues)."""
    return f"Instruction: {instruction}\nInput: {input_.strip() or '<noinput>'}"


# ---------------------------------------------------------------- lineages and attempts


@dataclass
class Node:
    """One version of a record: the original (depth 0) or a survivor."""

    id: str
    instruction: str
    input: str
    output: str
    depth: int


@dataclass
class Lineage:
    order: int
    root: Node
    parent: Node  # the latest survivor, the root until one survives
    ancestors: set[str]  # instructions of the root and every survivor: excluded from in-depth novelty checks
    next_round: int = 1
    active: Attempt | None = None  # the attempt under way (queued or sent), one at a time


@dataclass
class Attempt:
    """One (lineage, round): its rewrite travels through evolve → judge → answer until kept or eliminated."""

    lineage: Lineage
    round: int
    op: str
    step: str = "evolve"
    instruction: str = ""
    input: str = ""
    output: str = ""
    nearest: list[tuple[str, float]] = field(default_factory=list)
    checked_at: int = 0  # texts kept this session before the novelty check
    failures: int = 0  # requests of this attempt that failed after all retries, this session
    queued: int = 0  # its entry in the scheduling heap (0: not queued, its request is out)

    @property
    def id(self) -> str:
        return f"{self.lineage.root.id}.r{self.round}"

    def tag(self) -> tuple[str, int, str, str, str, str]:
        """What a request carries to find its attempt again, in this process or (a Batch API job) the next."""
        return (self.lineage.root.id, self.round, self.step, self.op, self.instruction, self.input)

    def evol(self) -> dict[str, Any]:
        parent = self.lineage.parent
        return {
            "parent_id": parent.id,
            "root_id": self.lineage.root.id,
            "op": self.op,
            "round": self.round,
            "depth": parent.depth + 1,
        }


def draw_op(seed: int, root_id: str, round_: int, ops: list[str]) -> str:
    """The operation of one (lineage, round): uniform, reproducible under `--seed` whatever the arrival order."""
    return random.Random(f"{seed}:evolve:{root_id}:{round_}").choice(ops)


class Tally:
    """Outcomes by (round, op): survivors and rejections by reason, for the progress line and summary.json."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, str, str]] = Counter()

    def add(self, round_: int, op: str, reason: str | None) -> None:
        self.counts[(round_, op, reason or "survived")] += 1

    def survived(self) -> int:
        return sum(n for (_, _, outcome), n in self.counts.items() if outcome == "survived")

    def to_dict(self) -> dict[str, Any]:
        rounds: dict[str, Any] = {}
        ops: dict[str, dict[str, Any]] = {}
        for (round_, op, outcome), n in sorted(self.counts.items()):
            r = rounds.setdefault(
                str(round_), {"attempts": 0, "survived": 0, "by_op": {}, "rejected_by_reason": {}}
            )
            o = r["by_op"].setdefault(op, {"attempts": 0, "survived": 0})
            total = ops.setdefault(op, {"attempts": 0, "survived": 0})
            for d in (r, o, total):
                d["attempts"] += n
            if outcome == "survived":
                for d in (r, o, total):
                    d["survived"] += n
            else:
                r["rejected_by_reason"][outcome] = r["rejected_by_reason"].get(outcome, 0) + n
        for total in ops.values():
            total["survival_rate"] = total["survived"] / total["attempts"]
        return {"rounds": rounds, "ops": ops}


class DurableJournal(Journal):
    """The run's journal, also telling whether what was appended up to a mark is on disk yet."""

    def mark(self) -> int:
        with self._cond:
            return self._submitted

    def durable(self, mark: int) -> bool:
        with self._cond:
            return self._durable >= mark


# ---------------------------------------------------------------- the stage


def _round_label(round_: int) -> str:
    return f"round {round_}"


class Evolver(NeedsEveryAnswer):
    """The `drive` source: schedules attempts (unfinished ones first, then lower rounds), judges the answers."""

    def __init__(
        self,
        ctx: RunContext,
        lineages: list[Lineage],
        originals: list[Node],
        survivors: list[Node],
        tally: Tally,
    ):
        cfg: EvolveConfig = ctx.cfg  # type: ignore[assignment]
        self.ctx, self.cfg, self.tally = ctx, cfg, tally
        self.journal: DurableJournal = ctx.journal  # type: ignore[assignment]
        self.ops = cfg.chosen_ops()
        self.templates = {step: ctx.prompts.get(f"evol_{step}") for step in (*self.ops, "judge", "answer")}
        pool = [n.instruction for n in (*originals, *survivors)]
        # A duplicate is a copy of a kept record (instruction and input: `complicate_input` may keep the
        # instruction); a retry that repeats an eliminated rewrite gets that rewrite's own reason again.
        self.heuristics = build_heuristics(cfg.filters.model_copy(update={"check_duplicate": False}))
        self.seen: set[str] | None = None
        if cfg.filters.check_duplicate:
            self.seen = {_record_key(n.instruction, n.input) for n in (*originals, *survivors)}
        # top-k room for a whole lineage, so the nearest text outside it is always among the k listed
        wide = cfg.filters.model_copy(update={"nearest_k": max(1, cfg.filters.nearest_k) + cfg.rounds + 1})
        self.index = novelty_index(wide, pool)
        self.kept_now: list[tuple[str, list[int]]] = []  # texts kept this session, as token ids
        self.vocab: dict[str, int] = {}
        self.leaks = [p.lower() for p in cfg.leak_phrases if p.strip()]
        self.heap: list[tuple[tuple[int, int, int], int, Attempt]] = []
        self.waiting: deque[tuple[int, Lineage]] = deque()  # lineages whose last outcome is not durable yet
        self.kept_out: list[dict[str, Any]] = []
        self.rejected_out: list[dict[str, Any]] = []
        self.decided: list[Lineage] = []  # lineages whose outcome this `handle` call writes
        self.lineages = {lineage.root.id: lineage for lineage in lineages}
        self.taken_over = False  # this `handle` call gave a resumed batch's answer to a queued attempt
        self._seq = 0
        for lineage in lineages:
            self._schedule(lineage)

    # -- scheduling
    def _push(self, a: Attempt) -> None:
        self._seq += 1
        a.queued = self._seq
        started = 0 if a.step != "evolve" else 1  # finish attempts under way before starting new ones
        heapq.heappush(self.heap, ((started, a.round, a.lineage.order), self._seq, a))

    def _schedule(self, lineage: Lineage) -> None:
        round_ = lineage.next_round
        if round_ <= self.cfg.rounds:
            lineage.active = Attempt(
                lineage, round_, draw_op(self.cfg.seed, lineage.root.id, round_, self.ops)
            )
            self._push(lineage.active)

    def _release(self, in_flight: int) -> None:
        """Schedule the next round of lineages whose outcome is on disk; wait for the disk only when idle."""
        if self.waiting and not self.heap and in_flight == 0:
            self.journal.flush()
        while self.waiting and self.journal.durable(self.waiting[0][0]):
            self._schedule(self.waiting.popleft()[1])

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        self._release(in_flight)
        if not self.heap:
            return None
        n = self.ctx.can_send(in_flight)
        batch = []
        for _ in range(min(n, len(self.heap))):
            a = heapq.heappop(self.heap)[2]
            a.queued = 0
            batch.append(self._request(a))
        return batch or None

    def _request(self, a: Attempt) -> TeacherRequest:
        ctx, cfg, parent = self.ctx, self.cfg, a.lineage.parent
        extra: dict[str, Any] = {}
        if a.step == "evolve":
            template = self.templates[a.op]
            values = {
                "task": format_task(parent.instruction, parent.input),
                "instruction": parent.instruction,
                "input": parent.input,
            }
            extra = (
                {"json_schema": evolved_schema(cfg.schema_max_chars)}
                if ctx.chat
                else {"stop": ["\n###", "\n\n\n"]}
            )
        elif a.step == "judge":
            template = self.templates["judge"]
            values = {
                "first": format_task(parent.instruction, parent.input),
                "second": format_task(a.instruction, a.input),
            }
            extra = {"json_schema": JUDGE_SCHEMA} if ctx.chat else {}
        else:
            template = self.templates["answer"]
            prompt = CorpusRecord(a.instruction, a.input).user_message()
            values = {"prompt": prompt, "instruction": a.instruction, "input": a.input}
            extra = {} if ctx.chat else {"stop": ["\n### "]}
        messages, prompt_text = template.render(**values)
        sampling = ctx.sampling(a.step, (a.lineage.root.id, a.round, a.step), **extra)
        return TeacherRequest(messages=messages, prompt=prompt_text, sampling=sampling, tag=a.tag())

    # -- answers
    def handle(self, responses: list[TeacherResponse]) -> None:
        label = "evolve"
        for response in responses:
            tag = response.request.tag
            label = _round_label(tag[1])
            if label not in self.ctx.stats:  # a resumed batch's round beyond a lowered --rounds
                label = "evolve"
            ok = self.ctx.accept(label, response)
            a = self._attempt(tag, resume=ok)
            if a is None:
                continue  # a resumed batch's answer about an attempt already decided (or just eliminated)
            if not ok:
                a.failures += 1
                if a.failures <= 1:
                    self._push(a)  # once more this session; after that the next run picks it up
                continue
            choice = response.choices[0] if response.choices else None
            text = choice.text if choice else ""
            truncated = choice is not None and choice.finish_reason == "length"
            getattr(self, f"_on_{a.step}")(a, text, truncated)
        if self.taken_over:  # drop the heap entries of attempts a resumed batch's answers took over
            self.heap = [entry for entry in self.heap if entry[2].queued == entry[1]]
            heapq.heapify(self.heap)
            self.taken_over = False
        self.journal.append(REJECTED, self.rejected_out)
        self.journal.append(EVOLVED, self.kept_out)
        mark = self.journal.mark()
        self.waiting.extend((mark, lineage) for lineage in self.decided)
        self.kept_out, self.rejected_out, self.decided = [], [], []
        self.ctx.on_tick(label)

    def _attempt(self, tag: Any, resume: bool) -> Attempt | None:
        """The attempt an answer belongs to: the one whose request is out, or (`resume`: a batch sent by an
        earlier process) the lineage's queued attempt of the same round, which takes the answer over at the
        step it was for. None when no attempt waits for it."""
        root_id, round_, step, op, instruction, input_ = tag
        lineage = self.lineages.get(root_id)
        a = lineage.active if lineage is not None else None
        if a is None or a.round != round_:
            return None
        if not a.queued:
            return a if a.step == step else None
        if not resume:
            return None
        a.queued, a.step, a.op, a.instruction, a.input = 0, step, op, instruction, input_
        self.taken_over = True
        if step != "evolve" and (reason := self._screen(a)):  # checked again against today's pool
            self._eliminate(a, reason)
            return None
        return a

    def _on_evolve(self, a: Attempt, text: str, truncated: bool) -> None:
        if truncated:
            return self._reject(a, "truncated", text[:RAW_TEXT_LIMIT])
        default_input = "" if a.op == "breadth" else a.lineage.parent.input
        parsed = parse_evolved(text if self.ctx.chat else "Instruction:" + text, default_input)
        if parsed is None:
            return self._reject(a, "unparseable", text[:RAW_TEXT_LIMIT])
        a.instruction, a.input = parsed
        if reason := self._screen(a):
            return self._eliminate(a, reason)
        self._next_step(a)

    def _eliminate(self, a: Attempt, reason: str) -> None:
        self._reject(a, reason, **({"judge": "copy"} if reason == EVOL_EQUAL else {}))  # no judge asked

    def _screen(self, a: Attempt) -> str | None:
        """Why a rewrite is eliminated before any further request (leak, copy, heuristics, duplicate, novelty)."""
        parent = a.lineage.parent
        lowered = f"{a.instruction}\n{a.input}".lower()
        if any(phrase in lowered for phrase in self.leaks):
            return EVOL_PROMPT_LEAK
        if (
            normalize(a.instruction) == normalize(parent.instruction)
            and a.input.strip() == parent.input.strip()
        ):
            return EVOL_EQUAL
        if reason := self.heuristics(a.instruction):
            return reason
        if self.seen is not None and _record_key(a.instruction, a.input) in self.seen:
            return "duplicate"
        if not self._novel(a):
            return TOO_SIMILAR
        return None

    def _on_judge(self, a: Attempt, text: str, truncated: bool) -> None:
        verdict = parse_judge(text)
        if verdict is None:
            return self._reject(a, "unparseable", judge=text[:RAW_TEXT_LIMIT])
        if verdict:
            return self._reject(a, EVOL_EQUAL, judge="equal")
        self._next_step(a)

    def _on_answer(self, a: Attempt, text: str, truncated: bool) -> None:
        a.output = text.strip()
        if truncated:
            return self._reject(a, "truncated", answer=a.output[:RAW_TEXT_LIMIT])
        if sorry_short(a.output, self.cfg.sorry_words):
            return self._reject(a, EVOL_SORRY_SHORT, answer=a.output)
        if stopwords_only(a.output):
            return self._reject(a, EVOL_STOPWORDS_ONLY, answer=a.output)
        self._keep(a)

    def _next_step(self, a: Attempt) -> None:
        steps = ["evolve", *(["judge"] if self.cfg.judge_equal == "teacher" else [])]
        steps += ["answer"] if self.cfg.answer else []
        position = steps.index(a.step)
        if position + 1 < len(steps):
            a.step = steps[position + 1]
            self._push(a)
        else:
            self._keep(a)

    def _novel(self, a: Attempt) -> bool:
        """Exact ROUGE-L novelty against the pool; an in-depth rewrite is not compared with its own lineage."""
        result = self.index.query([a.instruction], add_kept=False)[0]
        nearest = result.nearest
        if a.op != "breadth":
            nearest = [(t, f) for t, f in nearest if t not in a.lineage.ancestors]
        max_f = result.max_f if a.op == "breadth" else (nearest[0][1] if nearest else 0.0)
        a.nearest, a.checked_at = nearest[: self.cfg.filters.nearest_k], len(self.kept_now)
        return max_f <= self.index.threshold

    def _novel_since_check(self, a: Attempt) -> bool:
        """The novelty check again, against only the texts kept while the attempt was at the judge and the
        answer: exact ROUGE-L F pair by pair (none of them can be of its own lineage, which has one attempt at a
        time). Far cheaper than querying the whole pool again."""
        mine = self._token_ids(a.instruction)
        scores = [
            (text, rouge_fmeasure(LCSseq.similarity(mine, ids), len(mine), len(ids)))
            for text, ids in self.kept_now[a.checked_at :]
        ]
        scores = [(text, f) for text, f in scores if f > 0]
        a.nearest = sorted(a.nearest + scores, key=lambda pair: -pair[1])[: self.cfg.filters.nearest_k]
        return all(f <= self.index.threshold for _, f in scores)

    def _token_ids(self, text: str) -> list[int]:
        """The index's ROUGE tokens as small ints (LCS over ints: no hash collisions between distinct tokens)."""
        return [self.vocab.setdefault(token, len(self.vocab)) for token in self.index.tokenize(text)]

    # -- outcomes
    def _done(self, a: Attempt, reason: str | None) -> None:
        self.tally.add(a.round, a.op, reason)
        self.ctx.stats[_round_label(a.round)].done += 1
        a.lineage.next_round, a.lineage.active = a.round + 1, None
        self.decided.append(a.lineage)

    def _reject(self, a: Attempt, reason: str, raw: str | None = None, **meta: Any) -> None:
        nearest = a.nearest[0] if reason == TOO_SIMILAR and a.nearest else None
        rec = self.ctx.reject_record(
            _round_label(a.round),
            raw if raw is not None else a.instruction,
            reason,
            a.round,
            nearest,
            id=a.id,
            evol=a.evol(),
            input=a.input,
            step=a.step,
            **meta,
        )
        rec["stage"] = "evolve"
        self.rejected_out.append(rec)
        self._done(a, reason)

    def _keep(self, a: Attempt) -> None:
        if not self._novel_since_check(a):
            return self._reject(a, TOO_SIMILAR)
        evol = a.evol()
        node = Node(a.id, a.instruction, a.input, a.output, evol["depth"])
        self.kept_out.append(
            {
                "id": node.id,
                "instruction": node.instruction,
                "input": node.input,
                "output": node.output,
                "meta": {
                    "task_id": node.id,
                    "origin": "evolved",
                    "evol": evol,
                    "teacher_model": self.cfg.teacher.model,
                    "most_similar": dict(a.nearest),
                },
            }
        )
        self.index.add([a.instruction])
        self.kept_now.append((a.instruction, self._token_ids(a.instruction)))
        if self.seen is not None:
            self.seen.add(_record_key(a.instruction, a.input))
        a.lineage.parent = node
        a.lineage.ancestors.add(a.instruction)
        self._done(a, None)


# ---------------------------------------------------------------- the run directory


def load_input(path: str) -> tuple[list[CorpusRecord], Path]:
    """The records to evolve and the file they came from (a run directory's corpus.jsonl)."""
    p = Path(path).expanduser()
    if p.is_dir():
        corpus = p / CORPUS
        if not corpus.is_file():
            raise UserError(f"{p}: a run directory to evolve needs a {CORPUS} (or pass a corpus file)")
        return load_alpaca(corpus), corpus
    return load_corpus_any(p), p


def _mismatch(run: RunDir, identity: dict[str, Any]) -> Callable[[dict[str, Any]], str | None]:
    """Why a run directory belongs to another run: not an evolve run, or other input records."""

    def check(old: dict[str, Any]) -> str | None:
        if old.get("command") != "evolve":
            return f"{run.path} is not an evolve run; use another --out"
        if old.get("input_sha256") != identity["input_sha256"] or old.get("records") != identity["records"]:
            return (
                f"{run.path} evolved other records ({old.get('input')}, {old.get('records')} records); use the "
                "same INPUT and --max-records to resume, or another --out"
            )
        return None

    return check


def restore(
    run: RunDir, originals: list[Node]
) -> tuple[list[Lineage], list[Node], Tally, Counter[tuple[int, str]]]:
    """Lineages as the files leave them (each one's latest survivor and next round), and all survivors."""
    lineages = {
        n.id: Lineage(order=k, root=n, parent=n, ancestors={n.instruction}) for k, n in enumerate(originals)
    }
    tally, rejected = Tally(), Counter[tuple[int, str]]()
    seen: set[tuple[str, int]] = set()
    survivors: list[tuple[int, dict[str, Any]]] = []
    for name in (EVOLVED, REJECTED):
        for rec in read_jsonl(run / name):
            evol = (rec.get("meta") or {}).get("evol") or {}
            key = (evol.get("root_id"), evol.get("round"))
            lineage = lineages.get(key[0])
            if lineage is None or key in seen:
                continue
            seen.add(key)
            reason = rec.get("reason") if name == REJECTED else None
            tally.add(evol["round"], evol["op"], reason)
            if reason:
                rejected[(evol["round"], reason)] += 1
            else:
                survivors.append((evol["round"], rec))
            lineage.next_round = max(lineage.next_round, evol["round"] + 1)
    nodes = []
    for _, rec in sorted(survivors, key=lambda s: s[0]):
        lineage = lineages[rec["meta"]["evol"]["root_id"]]
        node = Node(rec["id"], rec["instruction"], rec["input"], rec["output"], rec["meta"]["evol"]["depth"])
        lineage.parent = node
        lineage.ancestors.add(node.instruction)
        nodes.append(node)
    return list(lineages.values()), nodes, tally, rejected


def write_corpus(run: RunDir, originals: list[CorpusRecord], include_originals: bool) -> int:
    """corpus.jsonl = the input records (unchanged, when included) + every survivor, replaced atomically."""
    records = [r.to_dict() for r in originals] if include_originals else []
    records += [
        {k: rec[k] for k in ("instruction", "input", "output", "meta")} for rec in read_jsonl(run / EVOLVED)
    ]
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    atomic_write_text(run / CORPUS, text)
    return len(records)


# ---------------------------------------------------------------- progress and summary


class EvolveMonitor(Monitor):
    """generate's progress display (one bar per round) with evolve's summary."""

    def __init__(self, ctx: RunContext, state: dict[str, Any], console: Console, tally: Tally, lineages: int):
        super().__init__(ctx, state, console)
        self.tally, self.lineages = tally, lineages
        self.corpus_records = 0

    def summary(self, final: bool) -> dict[str, Any]:
        ctx = self.ctx
        cfg: EvolveConfig = ctx.cfg  # type: ignore[assignment]
        rounds = {k: s for k, s in ctx.stats.items() if k.startswith("round ")}
        rejected: Counter[str] = Counter()
        for s in rounds.values():
            rejected.update(s.rejected)
        tallied = self.tally.to_dict()
        decided = sum(s.done for s in rounds.values())
        work = ctx.stats["evolve"]
        return {
            "pipeline": "evol",
            "teacher_model": cfg.teacher.model,
            "input": cfg.input,
            "records": self.lineages,
            "rounds": cfg.rounds,
            "ops": cfg.chosen_ops(),
            "target": self.lineages * cfg.rounds,
            "kept": self.tally.survived(),
            "candidates": decided,
            "rejected_by_reason": dict(rejected.most_common()),
            "parse_failures": sum(s.parse_failures for s in rounds.values()),
            **self.teacher_usage(),
            "elapsed_s": self.elapsed(),
            "session_elapsed_s": round(work.elapsed_s, 3),
            "session_cpu_s": round(work.cpu_s, 3),
            "corpus_records": self.corpus_records,
            "by_round": tallied["rounds"],
            "by_op": tallied["ops"],
            "stages": {name: s.to_dict() for name, s in rounds.items()},
            "finished": final and decided >= self.lineages * cfg.rounds,
            "stop_reason": ctx.stop_reason,
            "sessions": self.state.get("sessions", 1),
        }

    def print_final(self, summary: dict[str, Any], run: RunDir) -> None:
        """The closing summary; paths and reasons (a blacklist word) are printed as plain text, never as markup."""

        def line(text: str) -> None:
            self.console.print(text, markup=False, highlight=False)

        status = "finished" if summary["finished"] else f"stopped ({summary['stop_reason'] or 'incomplete'})"
        self.console.print()
        self.console.print(
            Text.assemble(
                (f"evolve {status}", "bold"), f": {summary['records']} records, {summary['rounds']} rounds"
            )
        )
        for round_, r in summary["by_round"].items():
            ops = ", ".join(f"{op} {o['survived']}/{o['attempts']}" for op, o in r["by_op"].items())
            line(f"  round {round_:<7} {r['survived']} / {r['attempts']} survived ({ops})")
        if summary["rejected_by_reason"]:
            line("  rejected      " + ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items()))
        line(
            f"  teacher       {summary['requests']} requests ({summary['failed_requests']} failed, "
            f"{summary['retries']} retries), {summary['prompt_tokens'] + summary['completion_tokens']:,} tokens, "
            f"${summary['cost']:.4f}, {summary['elapsed_s']:.1f} s"
        )
        line(f"  corpus        {summary['corpus_records']} records")
        for name in (EVOLVED, REJECTED, CORPUS, SUMMARY):
            if (run / name).exists():
                line(f"  {name:<20} {run / name}")
        if not summary["finished"]:
            line("  rerun the same command to continue")


# ---------------------------------------------------------------- the command


def evolve_decoding(cfg: EvolveConfig) -> dict[str, dict[str, Any]]:
    """Per-step decoding: the defaults with the command's overrides (`selfinstruct plan` reads it too)."""
    return {
        "evolve": {
            **DECODING["evolve"],
            "temperature": cfg.evolve_temperature,
            "max_tokens": cfg.evolve_max_tokens,
        },
        "judge": {**DECODING["judge"], "max_tokens": cfg.judge_max_tokens},
        "answer": {
            **DECODING["answer"],
            "temperature": cfg.answer_temperature,
            "max_tokens": cfg.answer_max_tokens,
        },
    }


def run_evolve(cfg: EvolveConfig, *, teacher: Teacher | None = None, console: Console | None = None) -> int:
    """Evolve (or resume evolving) `cfg.input` into `cfg.out`. `teacher`: an already started one (tests).

    Returns 0 when finished or stopped by a budget cap, 130 when interrupted.
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    if not cfg.input:
        raise UserError("evolve needs an INPUT: a run directory or a corpus file")
    records, source = load_input(cfg.input)
    records = records[: cfg.max_records]
    prompts = Prompts("chat" if cfg.teacher.api == "chat" else "completion", cfg.prompt_dir)
    for name in (*cfg.chosen_ops(), "judge", "answer"):  # fail on a bad template before any request
        prompts.get(f"evol_{name}")
    identity = {
        "command": "evolve",
        "input": str(source),
        "input_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "records": len(records),
    }
    originals = [Node(f"root_{k:06d}", r.instruction, r.input, r.output, 0) for k, r in enumerate(records)]
    with RunDir(cfg.out) as run:
        if run.path.resolve() == source.parent.resolve() and source.name == CORPUS:
            raise UserError(f"{run.path}: --out must not be the input run directory")
        state = open_state(run, identity, "an evolve run", _mismatch(run, identity))
        state["sessions"] = state.get("sessions", 0) + 1
        atomic_write_json(run / STATE, state)
        save_config("evolve", cfg, run / CONFIG)
        lineages, survivors, tally, rejected = restore(run, originals)
        if (shard := Shard.parse(cfg.shard)) is not None:  # every original stays in the novelty pool
            lineages = [lin for lin in lineages if shard.owns(lin.root.id)]
        todo = [lin for lin in lineages if lin.next_round <= cfg.rounds]
        own_teacher = teacher is None and bool(todo)
        the_teacher = teacher or (make_teacher(cfg.teacher) if todo else None)
        teacher_stats = the_teacher.stats if the_teacher is not None else TeacherStats()
        journal = DurableJournal(run, (EVOLVED, REJECTED))
        top_round = max([cfg.rounds, *(lin.next_round - 1 for lin in lineages)])
        stats = {"evolve": StageStats(total=len(lineages) * cfg.rounds)}
        for r in range(1, top_round + 1):
            stats[_round_label(r)] = StageStats(total=len(lineages))
        for (round_, reason), n in rejected.items():
            stats[_round_label(round_)].rejected[reason] += n
            if reason == "unparseable":
                stats[_round_label(round_)].parse_failures += n
        for (round_, _, _), n in tally.counts.items():
            stats[_round_label(round_)].done += n
        ctx = RunContext(
            cfg=cfg,  # type: ignore[arg-type]  # the fields RunContext reads are the same as generate's
            run=run,
            seeds=[],
            teacher=the_teacher,  # type: ignore[arg-type]
            prompts=prompts,
            journal=journal,
            budget=Budget.resumed(cfg, state.get("usage", {}), teacher_stats),
            decoding=evolve_decoding(cfg),
            stats=stats,
        )
        monitor = EvolveMonitor(ctx, state, console, tally, len(lineages))
        ctx.on_tick = monitor.tick
        try:
            if todo:
                evolver = Evolver(ctx, todo, originals, survivors, tally)
                with monitor:
                    asyncio.run(_session(ctx, evolver, own_teacher, console))
        finally:
            journal.close()
            monitor.corpus_records = write_corpus(run, records, cfg.include_originals)
            summary = monitor.write_final(run)
        monitor.print_final(summary, run)
    return exit_code(ctx)


async def _session(ctx: RunContext, evolver: Evolver, own_teacher: bool, console: Console) -> None:
    async with teacher_session(ctx, own_teacher, console):
        await run_stage(ctx, "evolve", evolver)
