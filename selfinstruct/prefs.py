"""`selfinstruct prefs`: preference pairs for DPO from an instruction corpus (UltraFeedback / Self-Rewarding).

For every prompt of the corpus, each policy (`--policy`, repeated) writes `--n` sampled answers; with
`--include-reference` the corpus's own output is one more candidate. The judge (the shared `[teacher]`) then
grades the candidates with a rubric template:

* `absolute` (UltraFeedback, argilla): each answer alone, 1–5 on helpfulness, honesty and instruction-following;
  its score is the mean of the three;
* `pairwise`: every two answers, in **both orders**. A comparison counts only when the two verdicts agree (the
  same answer wins whichever side it is shown on); a candidate's score is the number of others it beat that way.
  A judge that prefers a position over content therefore produces no pair at all.

Pairing per prompt: the best candidate is `chosen`; `rejected` is the worst one (`best-vs-worst`, as Self-Rewarding
LMs) or one drawn, seeded, from those below it (`best-vs-random-lower`, Zephyr). A pair must satisfy
`score_chosen - score_rejected >= --min-margin`; ties are always dropped; in pairwise mode the chosen answer must
have beaten the rejected one in both orders. An answer cut off at `--sample-max-tokens` is judged like the others
but may only be the rejected side (`--truncated rejected-only`, the default): a student that rambles on learns to
stop, and no pair teaches it to break off.

Policy specs (`--policy`):

* `vllm:MODEL` or a bare `MODEL`: an in-process vLLM engine on a directory, LoRA adapter (merged into its base
  once), `.gguf` file, hub id or built-in name such as `smollm2-135m-instruct`, e.g. the student `train` just
  wrote (on-policy data). Engine knobs (`--teacher-dtype`, `--gpu-memory-utilization`, `--max-model-len`,
  `--enforce-eager`, …) are the `[teacher]` ones;
* `openai:MODEL@URL`: a model served by an OpenAI-compatible endpoint (`openai:MODEL` alone: api.openai.com),
  with the `[teacher]` key variable, retries and rate limits.

Run directory (resumable like `generate`: rerun the same command): `samples.jsonl` (one line per prompt and
policy, journaled), `judgments.jsonl` (one line per judge request, an unparseable verdict included, journaled),
and, rebuilt from those two at the end of every session, `prefs.jsonl` (TRL's conversational preference format
plus `score_chosen`, `score_rejected` and `meta`) and `rejected.jsonl` (every candidate, comparison and prompt that
gave no pair, with its reason and the judge's raw output), `summary.json`, `config.toml`, `state.json`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations
from typing import Any, Literal

from pydantic import Field, ValidationError
from rich.console import Console

from selfinstruct.config import MaxCost, MaxTokens, PromptDir, Section, save_config
from selfinstruct.errors import UserError
from selfinstruct.evolve import load_input
from selfinstruct.generate import Monitor, open_state
from selfinstruct.models import resolve_model
from selfinstruct.parsing import _json_values, _object, _unfence
from selfinstruct.pipeline import REJECTED, RunContext, StageStats, run_stage
from selfinstruct.pipeline.runner import Budget, Journal, NeedsEveryAnswer
from selfinstruct.pipeline.session import exit_code, teacher_session
from selfinstruct.prompts import Prompts, Template
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import CONFIG, STATE, SUMMARY
from selfinstruct.store import RunDir, atomic_write_json, atomic_write_text, read_jsonl
from selfinstruct.teachers import Teacher, TeacherConfig, make_teacher
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse, Totals

SAMPLES = "samples.jsonl"
JUDGMENTS = "judgments.jsonl"
PREFS = "prefs.jsonl"

ASPECTS = ("helpfulness", "honesty", "instruction_following")
"""The absolute rubric's aspects (UltraFeedback rates these and truthfulness; honesty covers both here)."""

REFERENCE = "reference"
"""The policy name of the corpus's own output (`--include-reference`)."""

RAW_LIMIT = 2000  # characters of a judge's answer kept in meta and rejected.jsonl

ABSOLUTE_SCHEMA: dict[str, Any] = _object({a: {"type": "integer", "enum": [1, 2, 3, 4, 5]} for a in ASPECTS})
PAIRWISE_SCHEMA: dict[str, Any] = _object({"better": {"type": "string", "enum": ["A", "B", "tie"]}})


class PrefsConfig(Section):
    """The `[prefs]` table and the `selfinstruct prefs` flags."""

    input: str | None = Field(
        None,
        description="the prompts: a run directory (its corpus.jsonl), Alpaca JSON/JSONL or seed JSONL",
        json_schema_extra={"positional": True},
    )
    out: str = Field("outputs/prefs", description="run directory (rerun the same command on it to resume)")
    policy: list[str] = Field(
        [],
        description="who writes candidate answers: vllm:MODEL (or a bare MODEL: in-process vLLM on a "
        "directory, LoRA adapter, .gguf, hub id or built-in name) or openai:MODEL@URL (an OpenAI-compatible "
        "endpoint)",
    )
    n: int = Field(4, ge=1, description="answers sampled per prompt from each policy")
    include_reference: bool = Field(
        False, description="the corpus's own output is one more candidate (policy 'reference')"
    )
    rubric: Literal["absolute", "pairwise"] = Field(
        "absolute",
        description="absolute: the judge grades each answer 1-5 on three aspects (score = mean); pairwise: "
        "every two answers in both orders, only agreeing verdicts count (score = answers beaten)",
    )
    pairing: Literal["best-vs-worst", "best-vs-random-lower"] = Field(
        "best-vs-worst",
        description="rejected answer: the worst candidate, or a seeded random one scored lower than the best",
    )
    min_margin: float = Field(
        1.0,
        ge=0,
        description="keep a pair only if score_chosen - score_rejected is at least this (ties never)",
    )
    max_records: int | None = Field(None, ge=1, description="use only the first N prompts of the corpus")
    seed: int = Field(0, description="seed for per-request sampling seeds and best-vs-random-lower")
    temperature: float = Field(0.8, ge=0, description="policy sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="policy sampling top_p")
    sample_max_tokens: int = Field(512, ge=1, description="max tokens of a policy answer")
    truncated: Literal["rejected-only", "drop", "keep"] = Field(
        "rejected-only",
        description="answers cut off at --sample-max-tokens: judged, but only ever the rejected side of a pair "
        "(a model that never stops learns to stop); drop: not candidates; keep: like any other answer",
    )
    judge_max_tokens: int = Field(64, ge=1, description="max tokens of a judge verdict")
    request_batch: int | None = Field(
        None, ge=1, description="requests per teacher call (default: what the backend prefers)"
    )
    max_requests: int | None = Field(
        None, ge=1, description="stop after this many requests (policies + judge, whole run)"
    )
    max_tokens: MaxTokens = None
    max_cost: MaxCost = None
    prompt_dir: PromptDir = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the judge LLM")


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    spec: str  # as given: the name in samples.jsonl and meta.policies
    backend: Literal["vllm", "openai"]
    model: str
    base_url: str | None = None


def parse_policy(spec: str) -> Policy:
    """`vllm:MODEL`, a bare `MODEL` (vLLM too), `openai:MODEL@URL` or `openai:MODEL`."""
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "openai":
        model, at, url = rest.rpartition("@")
        if not at or not url.startswith(("http://", "https://")):
            model, url = rest, ""
        if not model:
            raise UserError(f"--policy {spec}: openai:MODEL@URL needs a model name")
        return Policy(spec, "openai", model, url or None)
    if sep and kind == "vllm":
        if not rest:
            raise UserError(f"--policy {spec}: vllm:MODEL needs a model")
        return Policy(spec, "vllm", rest)
    if not spec or spec == REFERENCE:
        raise UserError(f"--policy {spec!r}: not a policy (use --include-reference for the corpus's outputs)")
    return Policy(spec, "vllm", spec)


def policy_teacher(cfg: PrefsConfig, policy: Policy) -> TeacherConfig:
    """The policy's teacher settings: the `[teacher]` ones (engine knobs, key, retries) for another model."""
    values = {**cfg.teacher.model_dump(), "backend": policy.backend, "model": policy.model, "api": "chat"}
    values["base_url"] = [policy.base_url] if policy.base_url else []
    try:
        return TeacherConfig.model_validate(values)
    except ValidationError as e:
        raise UserError(f"--policy {policy.spec}: {e.errors()[0]['msg']}") from None


# ---------------------------------------------------------------- parsing the judge


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int | float) and value == int(value) and 1 <= value <= 5:
        return int(value)
    return None


def parse_absolute(text: str) -> dict[str, int] | None:
    """The three aspect scores: from JSON, else from `aspect: N` lines (any case, `_`, `-` or space); None
    unless every aspect has an integer from 1 to 5."""
    body = _unfence(text)
    value, ok = _json_values(body)
    scores: dict[str, int] = {}
    if ok and isinstance(value, dict):
        lowered = {re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in value.items()}
        for aspect in ASPECTS:
            if (s := _score(lowered.get(aspect))) is not None:
                scores[aspect] = s
    else:
        for aspect in ASPECTS:
            words = aspect.replace("_", r"[\s_-]*")
            m = re.search(rf"\b{words}\b\W{{0,6}}(\d+(?:\.\d+)?)\b", body, re.I)
            if m and (s := _score(float(m.group(1)))) is not None:
                scores[aspect] = s
    return scores if len(scores) == len(ASPECTS) else None


_VERDICT = re.compile(
    r"(?:\b(?:answer|response)\s+([AB])\b\s+(?:is\s+)?(?:better|wins|preferred)"
    r"|\b(?:better|winner|verdict|prefer(?:red)?)\b\W{0,12}(?:(?:is|answer|response)\s+)*([AB]|tie)\b"
    r"|^\W*([AB]|tie)\W*$)",
    re.I | re.M,
)


def parse_pairwise(text: str) -> Literal["A", "B", "tie"] | None:
    """The verdict of one comparison: `{"better": "A"|"B"|"tie"}`, a bare `A`/`B`/`tie`, or a phrase like
    "Answer B is better"; None when absent or when the text names both answers as the winner."""
    body = _unfence(text)
    value, ok = _json_values(body)
    found: set[str] = set()
    if ok and isinstance(value, dict) and isinstance(value.get("better"), str):
        found.add(value["better"].strip().removeprefix("Answer ").removeprefix("answer "))
    elif not ok:
        for m in _VERDICT.finditer(body):
            found.add(next(g for g in m.groups() if g))
    verdicts = {"a": "A", "b": "B", "tie": "tie"}
    normal = {verdicts.get(v.lower()) for v in found}
    if len(normal) != 1 or None in normal:
        return None
    return normal.pop()  # type: ignore[return-value]


# ---------------------------------------------------------------- candidates and pairing


@dataclass
class Candidate:
    key: str  # "POLICY#k": unique within a prompt
    policy: str
    text: str
    truncated: bool = False  # cut off at max tokens


def prompt_messages(record: CorpusRecord) -> list[dict[str, str]]:
    """The prompt as TRL's conversational format (and the policies) see it: one user turn, as `train` builds."""
    return [{"role": "user", "content": record.user_message()}]


def candidates_of(
    samples: dict[str, dict[str, Any]],
    policies: list[str],
    record: CorpusRecord,
    reference: bool,
    truncated: str = "rejected-only",
) -> tuple[list[Candidate], list[tuple[str, str, str]]]:
    """The usable answers of one prompt, and (candidate key, reason, text) for the unusable ones."""
    out, dropped = [], []
    for spec in policies:
        for k, c in enumerate(samples[spec]["completions"]):
            key, text, cut = f"{spec}#{k}", c["text"].strip(), c.get("finish_reason") == "length"
            if not text:
                dropped.append((key, "empty", text))
            elif cut and truncated == "drop":
                dropped.append((key, "truncated", text))
            else:
                out.append(Candidate(key, spec, text, cut and truncated == "rejected-only"))
    if reference:
        if record.output.strip():
            out.append(Candidate(f"{REFERENCE}#0", REFERENCE, record.output.strip()))
        else:
            dropped.append((f"{REFERENCE}#0", "empty", ""))
    return out, dropped


def judge_keys(rubric: str, candidates: list[Candidate]) -> list[tuple[str, ...]]:
    """What the judge is asked about one prompt: each candidate (absolute) or each ordered pair (pairwise)."""
    if rubric == "absolute":
        return [(c.key,) for c in candidates]
    return [(a.key, b.key) for a, b in permutations(candidates, 2)]


@dataclass
class Scored:
    scores: dict[str, float]  # candidate key -> score
    beaten: dict[
        str, set[str]
    ]  # pairwise: key -> keys it beat in both orders (absolute: everyone scored lower)
    raw: dict[tuple[str, ...], str]  # judge key -> raw answer
    inconsistent: int = 0  # pairwise: comparisons whose two orders named different winners


def score_absolute(
    candidates: list[Candidate], judgments: dict[tuple[str, ...], dict[str, Any]]
) -> tuple[Scored, list[tuple[str, str, dict[str, Any]]]]:
    """Mean aspect score per candidate; unparseable verdicts drop their candidate."""
    scores, raw, dropped = {}, {}, []
    for c in candidates:
        j = judgments[(c.key,)]
        raw[(c.key,)] = j["raw"]
        if j.get("error"):
            dropped.append((c.key, "judge_unparseable", {"raw": j["raw"]}))
        else:
            scores[c.key] = round(sum(j["scores"].values()) / len(j["scores"]), 6)
    beaten = {a: {b for b in scores if scores[b] < scores[a]} for a in scores}
    return Scored(scores, beaten, raw), dropped


def score_pairwise(
    candidates: list[Candidate], judgments: dict[tuple[str, ...], dict[str, Any]]
) -> tuple[Scored, list[tuple[str, str, dict[str, Any]]]]:
    """Wins over the others, counting a comparison only when both orders name the same winner."""
    beaten: dict[str, set[str]] = {c.key: set() for c in candidates}
    raw, dropped = {}, []
    for i, a in enumerate(candidates):
        for b in candidates[i + 1 :]:
            first, second = judgments[(a.key, b.key)], judgments[(b.key, a.key)]
            raw[(a.key, b.key)], raw[(b.key, a.key)] = first["raw"], second["raw"]
            detail = {"pair": [a.key, b.key], "raw_ab": first["raw"], "raw_ba": second["raw"]}
            if first.get("error") or second.get("error"):
                dropped.append((f"{a.key} vs {b.key}", "judge_unparseable", detail))
                continue
            # the winner by candidate: "A" in the (a, b) order is a; "A" in the (b, a) order is b
            win_ab = {"A": a.key, "B": b.key}.get(first["verdict"])
            win_ba = {"A": b.key, "B": a.key}.get(second["verdict"])
            if win_ab is None and win_ba is None:
                continue  # a tie in both orders: neither is better
            if win_ab != win_ba:
                dropped.append((f"{a.key} vs {b.key}", "position_inconsistent", detail))
                continue
            loser = b.key if win_ab == a.key else a.key
            beaten[win_ab].add(loser)  # type: ignore[index]
    scores = {k: float(len(v)) for k, v in beaten.items()}
    inconsistent = sum(reason == "position_inconsistent" for _, reason, _ in dropped)
    return Scored(scores, beaten, raw, inconsistent), dropped


def choose_pair(
    scored: Scored,
    order: list[str],
    pairing: str,
    min_margin: float,
    rng: random.Random,
    never_chosen: frozenset[str] = frozenset(),
) -> tuple[str, str] | str:
    """(chosen, rejected) keys, or the reason there is no pair: `too_few_candidates`, `no_complete_answer`
    (every candidate that may be chosen is missing), `tie` (nobody is better than anybody), `no_agreeing_win`
    (pairwise: nobody beat anybody in both orders, and some verdicts contradicted each other across orders),
    `below_margin`. `never_chosen`: candidates that may only be rejected (cut-off answers)."""
    keys = [k for k in order if k in scored.scores]
    if len(keys) < 2:
        return "too_few_candidates"
    s = scored.scores
    eligible = [k for k in keys if k not in never_chosen]
    if not eligible:
        return "no_complete_answer"
    best = max(eligible, key=lambda k: s[k])  # the first of equally good ones
    if not scored.beaten[best]:
        return "no_agreeing_win" if scored.inconsistent else "tie"
    lower = [k for k in keys if k in scored.beaten[best]]
    lower = [k for k in lower if s[best] - s[k] >= min_margin and s[k] < s[best]]
    if not lower:
        return "below_margin"
    if pairing == "best-vs-worst":
        return best, min(lower, key=lambda k: s[k])
    return best, rng.choice(lower)


# ---------------------------------------------------------------- the two teacher stages


class Sampler(NeedsEveryAnswer):
    """One policy's answers: one request (n samples) per prompt it has not answered yet."""

    def __init__(self, ctx: RunContext, policy: Policy, todo: list[tuple[str, CorpusRecord]]):
        self.ctx, self.policy, self.label = ctx, policy, f"sample {policy.spec}"
        self.todo = list(reversed(todo))
        self.retried: set[str] = set()

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        n = min(self.ctx.can_send(in_flight), len(self.todo))
        return [self._request(*self.todo.pop()) for _ in range(n)] or None

    def _request(self, pid: str, record: CorpusRecord) -> TeacherRequest:
        sampling = self.ctx.sampling("sample", (self.policy.spec, pid))
        return TeacherRequest(messages=prompt_messages(record), sampling=sampling, tag=(pid, record))

    def handle(self, responses: list[TeacherResponse]) -> None:
        lines = []
        for response in responses:
            pid, record = response.request.tag
            if not self.ctx.accept(self.label, response):
                if pid not in self.retried:  # once more this session; after that the next run
                    self.retried.add(pid)
                    self.todo.insert(0, (pid, record))
                continue
            completions = [{"text": c.text, "finish_reason": c.finish_reason} for c in response.choices]
            lines.append({"id": pid, "policy": self.policy.spec, "completions": completions})
        self.ctx.stats[self.label].done += len(lines)
        self.ctx.journal.append(SAMPLES, lines)
        self.ctx.on_tick(self.label)


class Judge(NeedsEveryAnswer):
    """The judge's verdicts: one request per candidate (absolute) or ordered pair of candidates (pairwise)."""

    def __init__(self, ctx: RunContext, template: Template, rubric: str, todo: list[tuple[str, tuple, dict]]):
        self.ctx, self.template, self.rubric = ctx, template, rubric
        self.todo = list(reversed(todo))  # (prompt id, judge key, template values)
        self.retried: set[tuple[str, tuple]] = set()

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        n = min(self.ctx.can_send(in_flight), len(self.todo))
        return [self._request(*self.todo.pop()) for _ in range(n)] or None

    def _request(self, pid: str, key: tuple, values: dict[str, str]) -> TeacherRequest:
        messages, prompt = self.template.render(**values)
        schema = ABSOLUTE_SCHEMA if self.rubric == "absolute" else PAIRWISE_SCHEMA
        extra = {"json_schema": schema} if self.ctx.chat else {"stop": ["\n\n", "###"]}
        sampling = self.ctx.sampling("judge", (pid, key), **extra)
        return TeacherRequest(messages=messages, prompt=prompt, sampling=sampling, tag=(pid, key, values))

    def handle(self, responses: list[TeacherResponse]) -> None:
        lines = []
        for response in responses:
            pid, key, values = response.request.tag
            if not self.ctx.accept("judge", response):
                if (pid, key) not in self.retried:
                    self.retried.add((pid, key))
                    self.todo.insert(0, (pid, key, values))
                continue
            text = response.choices[0].text if response.choices else ""
            line: dict[str, Any] = {"id": pid, "candidates": list(key), "raw": text[:RAW_LIMIT]}
            if self.rubric == "absolute":
                # a completion prompt ends with the first aspect's label: the model continues after it
                scores = parse_absolute(text if self.ctx.chat else f"{ASPECTS[0]}:{text}")
                line.update({"scores": scores} if scores else {"error": "unparseable"})
            else:
                verdict = parse_pairwise(text)
                line.update({"verdict": verdict} if verdict else {"error": "unparseable"})
            if "error" in line:
                self.ctx.stats["judge"].parse_failures += 1
            lines.append(line)
        self.ctx.stats["judge"].done += len(lines)
        self.ctx.journal.append(JUDGMENTS, lines)
        self.ctx.on_tick("judge")


# ---------------------------------------------------------------- the run directory


@dataclass
class Plan:
    """What the files say: samples by prompt and policy, verdicts by prompt and judge key."""

    records: list[tuple[str, CorpusRecord]]
    policies: list[Policy]
    samples: dict[str, dict[str, dict[str, Any]]]  # prompt id -> policy spec -> line
    judgments: dict[str, dict[tuple[str, ...], dict[str, Any]]]  # prompt id -> judge key -> line

    @classmethod
    def read(cls, run: RunDir, records: list[tuple[str, CorpusRecord]], policies: list[Policy]) -> Plan:
        samples: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for line in read_jsonl(run / SAMPLES):
            samples[line["id"]].setdefault(line["policy"], line)
        judgments: dict[str, dict[tuple[str, ...], dict[str, Any]]] = defaultdict(dict)
        for line in read_jsonl(run / JUDGMENTS):
            judgments[line["id"]].setdefault(tuple(line["candidates"]), line)
        return cls(records, policies, samples, judgments)

    def sample_todo(self, policy: Policy) -> list[tuple[str, CorpusRecord]]:
        return [(pid, r) for pid, r in self.records if policy.spec not in self.samples[pid]]

    def sampled(self, pid: str) -> bool:
        return all(p.spec in self.samples[pid] for p in self.policies)

    def candidates(self, pid: str, record: CorpusRecord, cfg: PrefsConfig):
        specs = [p.spec for p in self.policies]
        return candidates_of(self.samples[pid], specs, record, cfg.include_reference, cfg.truncated)


def judge_todo(plan: Plan, cfg: PrefsConfig) -> tuple[list[tuple[str, tuple, dict]], int]:
    """The judge requests still to send, and how many the sampled prompts need in all."""
    todo, total = [], 0
    for pid, record in plan.records:
        if not plan.sampled(pid):
            continue
        candidates, _ = plan.candidates(pid, record, cfg)
        text = {c.key: c.text for c in candidates}
        for key in judge_keys(cfg.rubric, candidates):
            total += 1
            if key in plan.judgments[pid]:
                continue
            instruction = record.user_message()
            if cfg.rubric == "absolute":
                values = {"instruction": instruction, "response": text[key[0]]}
            else:
                values = {"instruction": instruction, "first": text[key[0]], "second": text[key[1]]}
            todo.append((pid, key, values))
    return todo, total


@dataclass
class Built:
    pairs: int = 0
    pending: int = 0  # prompts not fully sampled and judged yet
    rejected: Counter[str] | None = None


def build_outputs(run: RunDir, plan: Plan, cfg: PrefsConfig, template: Template) -> Built:
    """prefs.jsonl and rejected.jsonl from the journaled samples and verdicts, replaced atomically."""
    prefs, rejected, built = [], [], Built(rejected=Counter())
    assert built.rejected is not None
    for pid, record in plan.records:
        if not plan.sampled(pid):
            built.pending += 1
            continue
        candidates, dropped = plan.candidates(pid, record, cfg)
        verdicts = plan.judgments[pid]
        if any(key not in verdicts for key in judge_keys(cfg.rubric, candidates)):
            built.pending += 1
            continue
        base = {"id": pid, "instruction": record.instruction, "input": record.input}

        def reject(reason: str, base: dict[str, Any] = base, **detail: Any) -> None:
            built.rejected[reason] += 1  # type: ignore[index]
            rejected.append({**base, "reason": reason, **detail})

        for key, reason, text in dropped:
            reject(reason, stage="sample", candidate=key, text=text[:RAW_LIMIT])
        score = score_absolute if cfg.rubric == "absolute" else score_pairwise
        scored, judge_dropped = score(candidates, verdicts)
        for key, reason, detail in judge_dropped:
            reject(reason, stage="judge", candidate=key, **detail)
        rng = random.Random(f"{cfg.seed}:pair:{pid}")
        cut = frozenset(c.key for c in candidates if c.truncated)
        pair = choose_pair(scored, [c.key for c in candidates], cfg.pairing, cfg.min_margin, rng, cut)
        if isinstance(pair, str):
            reject(pair, stage="pair", scores=scored.scores)
            continue
        by_key = {c.key: c for c in candidates}
        chosen, loser = by_key[pair[0]], by_key[pair[1]]
        if cfg.rubric == "absolute":
            raw = {"chosen": scored.raw[(chosen.key,)], "rejected": scored.raw[(loser.key,)]}
            aspects = {
                "chosen": verdicts[(chosen.key,)]["scores"],
                "rejected": verdicts[(loser.key,)]["scores"],
            }
        else:
            raw = {
                "chosen_first": scored.raw[(chosen.key, loser.key)],
                "rejected_first": scored.raw[(loser.key, chosen.key)],
            }
            aspects = None
        prefs.append(
            {
                "prompt": prompt_messages(record),
                "chosen": [{"role": "assistant", "content": chosen.text}],
                "rejected": [{"role": "assistant", "content": loser.text}],
                "score_chosen": scored.scores[chosen.key],
                "score_rejected": scored.scores[loser.key],
                "meta": {
                    "id": pid,
                    "policies": {"chosen": chosen.policy, "rejected": loser.policy},
                    "candidates": {"chosen": chosen.key, "rejected": loser.key},
                    "rejected_truncated": loser.truncated,
                    "judge": cfg.teacher.model,
                    "rubric": cfg.rubric,
                    "rubric_template": f"{template.name}@{template.hash}",
                    "pairing": cfg.pairing,
                    "judge_raw": raw,
                    **({"aspects": aspects} if aspects else {}),
                    "scores": scored.scores,
                },
            }
        )
    write = lambda name, rows: atomic_write_text(  # noqa: E731
        run / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write(PREFS, prefs)
    write(REJECTED, rejected)
    built.pairs = len(prefs)
    return built


def _mismatch(run: RunDir, identity: dict[str, Any]) -> Callable[[dict[str, Any]], str | None]:
    def check(old: dict[str, Any]) -> str | None:
        if old.get("command") != "prefs":
            return f"{run.path} is not a prefs run; use another --out"
        for key in ("input_sha256", "records", "policies", "n", "include_reference", "rubric"):
            if old.get(key) != identity[key]:
                return (
                    f"{run.path} was made with other settings ({key}: {old.get(key)!r}, now "
                    f"{identity[key]!r}); use the same INPUT, --max-records, --policy, --n, "
                    "--include-reference and --rubric to resume, or another --out"
                )
        return None

    return check


# ---------------------------------------------------------------- progress and summary


class PrefsMonitor(Monitor):
    """generate's progress display (a bar per policy and one for the judge) with prefs' summary."""

    def __init__(self, ctx: RunContext, state: dict[str, Any], console: Console, records: int):
        super().__init__(ctx, state, console)
        self.records = records
        self.built = Built(rejected=Counter())

    def summary(self, final: bool) -> dict[str, Any]:
        ctx = self.ctx
        cfg: PrefsConfig = ctx.cfg  # type: ignore[assignment]
        usage = ctx.budget.total()
        return {
            "command": "prefs",
            "judge_model": cfg.teacher.model,
            "policies": cfg.policy,
            "include_reference": cfg.include_reference,
            "rubric": cfg.rubric,
            "pairing": cfg.pairing,
            "min_margin": cfg.min_margin,
            "records": self.records,
            "pairs": self.built.pairs,
            "pending": self.built.pending,
            "rejected_by_reason": dict((self.built.rejected or Counter()).most_common()),
            "parse_failures": sum(s.parse_failures for s in ctx.stats.values()),
            "requests": usage.requests,
            "failed_requests": usage.failed_requests,
            "retries": usage.retries,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": round(usage.cost, 6),
            "elapsed_s": self.elapsed(),
            "stages": {name: s.to_dict() for name, s in ctx.stats.items()},
            "finished": final and self.built.pending == 0 and ctx.stop_reason is None,
            "stop_reason": ctx.stop_reason,
            "sessions": self.state.get("sessions", 1),
        }

    def print_final(self, summary: dict[str, Any], run: RunDir) -> None:
        def line(text: str) -> None:
            self.console.print(text, markup=False, highlight=False)

        self.console.print()
        status = "finished" if summary["finished"] else f"stopped ({summary['stop_reason'] or 'incomplete'})"
        line(f"prefs {status}: {summary['records']} prompts, {summary['rubric']} rubric")
        line(f"  pairs         {summary['pairs']} ({summary['pending']} prompts not done)")
        if summary["rejected_by_reason"]:
            line("  rejected      " + ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items()))
        line(
            f"  requests      {summary['requests']} ({summary['failed_requests']} failed, "
            f"{summary['retries']} retries), {summary['prompt_tokens'] + summary['completion_tokens']:,} "
            f"tokens, ${summary['cost']:.4f}, {summary['elapsed_s']:.1f} s"
        )
        for name in (PREFS, REJECTED, SUMMARY):
            line(f"  {name:<20} {run / name}")
        if not summary["finished"]:
            line("  rerun the same command to continue")


# ---------------------------------------------------------------- the command


def _check(cfg: PrefsConfig) -> list[Policy]:
    if not cfg.input:
        raise UserError("prefs needs an INPUT: a run directory or a corpus file")
    policies = [parse_policy(spec) for spec in cfg.policy]
    if not policies and not cfg.include_reference:
        raise UserError("prefs needs at least one --policy (or --include-reference)")
    if len({p.spec for p in policies}) != len(policies):
        raise UserError("--policy: the same policy is given twice (use --n for more answers from one)")
    if len(policies) * cfg.n + cfg.include_reference < 2:
        raise UserError("prefs needs at least two candidates per prompt: raise --n or add a policy")
    for p in policies:  # a bad model path fails before any engine starts or request is sent
        if policy_teacher(cfg, p).in_process:
            resolve_model(p.model, f"--policy {p.spec}", trust_remote_code=cfg.teacher.trust_remote_code)
    return policies


def run_prefs(cfg: PrefsConfig, *, console: Console | None = None) -> int:
    """Sample, judge and pair (or resume doing so) `cfg.input` into `cfg.out`.

    Returns 0 when finished or stopped by a budget cap, 130 after Ctrl-C, 143 after SIGTERM.
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    policies = _check(cfg)
    corpus, source = load_input(str(cfg.input))
    corpus = corpus[: cfg.max_records]
    records = [(f"p{k:06d}", r) for k, r in enumerate(corpus)]
    template = Prompts("chat" if cfg.teacher.api == "chat" else "completion", cfg.prompt_dir).get(
        f"prefs_{cfg.rubric}"
    )
    identity = {
        "command": "prefs",
        "input": str(source),
        "input_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "records": len(records),
        "policies": [p.spec for p in policies],
        "n": cfg.n,
        "include_reference": cfg.include_reference,
        "rubric": cfg.rubric,
    }
    with RunDir(cfg.out) as run:
        state = open_state(run, identity, "a prefs run", _mismatch(run, identity))
        state["sessions"] = state.get("sessions", 0) + 1
        atomic_write_json(run / STATE, state)
        save_config("prefs", cfg, run / CONFIG)
        plan = Plan.read(run, records, policies)
        stats = {}
        for p in policies:
            stats[f"sample {p.spec}"] = StageStats(
                total=len(records), done=len(records) - len(plan.sample_todo(p))
            )
        stats["judge"] = StageStats()
        journal = Journal(run, (SAMPLES, JUDGMENTS))
        ctx = RunContext(
            cfg=cfg,  # type: ignore[arg-type]  # the fields RunContext reads are the same as generate's
            run=run,
            seeds=[],
            teacher=None,  # type: ignore[arg-type]  # set per stage
            prompts=Prompts("chat"),
            journal=journal,
            budget=_budget(cfg, Totals(**state.get("usage", {})), None),
            decoding={
                "sample": {
                    "n": cfg.n,
                    "temperature": cfg.temperature,
                    "top_p": cfg.top_p,
                    "max_tokens": cfg.sample_max_tokens,
                },
                "judge": {"temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.judge_max_tokens},
            },
            stats=stats,
        )
        monitor = PrefsMonitor(ctx, state, console, len(records))
        ctx.on_tick = monitor.tick
        try:
            with monitor:
                asyncio.run(_session(ctx, cfg, plan, policies, template, console))
        finally:
            journal.close()
            monitor.built = build_outputs(run, Plan.read(run, records, policies), cfg, template)
            summary = monitor.write_final(run)
        monitor.print_final(summary, run)
    return exit_code(ctx)


def _budget(cfg: PrefsConfig, spent: Totals, teacher: Teacher | None) -> Budget:
    """The run's caps over everything spent so far plus what `teacher` spends from now on."""
    stats = teacher.stats if teacher is not None else Totals()
    return Budget(
        cfg.max_requests, cfg.max_tokens, cfg.max_cost, earlier=spent, stats=stats, at_start=Totals.of(stats)
    )  # type: ignore[arg-type]


async def _session(
    ctx: RunContext,
    cfg: PrefsConfig,
    plan: Plan,
    policies: list[Policy],
    template: Template,
    console: Console,
) -> None:
    """Each policy in turn (one engine at a time), then the judge; the first Ctrl-C or SIGTERM stops cleanly."""
    async with teacher_session(ctx, False, console):  # each teacher is started and closed in its turn
        for policy in policies:
            todo = plan.sample_todo(policy)
            if todo and ctx.stop_reason is None:
                await _with_teacher(ctx, cfg, policy_teacher(cfg, policy), Sampler(ctx, policy, todo))
        if ctx.stop_reason is None:
            plan = Plan.read(ctx.run, plan.records, policies)
            todo, total = judge_todo(plan, cfg)
            ctx.stats["judge"].total, ctx.stats["judge"].done = total, total - len(todo)
            if todo:
                await _with_teacher(ctx, cfg, cfg.teacher, Judge(ctx, template, cfg.rubric, todo))


async def _with_teacher(ctx: RunContext, cfg: PrefsConfig, teacher_cfg: TeacherConfig, source: Any) -> None:
    """Start one teacher, drive one stage with it under the run's budget, close it."""
    teacher = make_teacher(teacher_cfg)
    spent = ctx.budget.total()
    await teacher.start()
    ctx.teacher, ctx.budget = teacher, _budget(cfg, spent, teacher)
    try:
        await run_stage(ctx, source.label if isinstance(source, Sampler) else "judge", source)
    finally:
        await teacher.close()
