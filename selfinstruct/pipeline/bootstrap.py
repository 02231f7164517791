"""Self-Instruct step 1: grow the pool of instructions from seeds until `--num-instructions` are kept.

Each prompt shows `num_prompt_instructions` examples: `num_machine_in_prompt` sampled from the instructions
kept so far plus seeds for the rest (all seeds until machine ones exist), shuffled. A base model continues the
numbered list (stop at a blank line or at the item after `new_per_prompt` new ones; a completion cut off by
max_tokens is discarded whole, as the reference does); a chat model is asked for `new_per_prompt` new tasks in
JSON. Candidates then go through the heuristic filters and the exact ROUGE-L novelty filter (`Keeper`, shared
with the Alpaca pipeline) in the order their answers arrive.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.filters import TOO_SIMILAR, CandidateFilter, Decision
from selfinstruct.parsing import instructions_schema, parse_continued_list, parse_instruction_list
from selfinstruct.parsing import shown as shown_text
from selfinstruct.pipeline import INSTRUCTIONS, REJECTED, RunContext, run_stage
from selfinstruct.prompts import Demo
from selfinstruct.records import Instance
from selfinstruct.shard import Shard
from selfinstruct.store import read_jsonl
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

DEMO_LIST = 4
"""Seed instructions in the demonstration's example list (chat prompts; a short list keeps the prompt short)."""

RAW_TEXT_LIMIT = 2000
"""Characters of an unreadable or truncated completion kept in rejected.jsonl (enough to see what went wrong)."""


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
        self.filter = CandidateFilter(ctx.cfg.filters, pool=pool)
        # a shard's ids must not collide with another shard's when `merge` joins them
        self.shard = Shard.parse(getattr(ctx.cfg, "shard", None))
        self.id_prefix = f"gen_s{self.shard.index}_" if self.shard else "gen_"

    @property
    def count(self) -> int:
        return len(self.kept)

    def offer(self, candidates: list[Candidate], round_: int, meta: dict[str, Any], limit: int) -> int:
        """Filter candidates in order, journal kept and rejected ones; keep at most up to `limit` in the pool.

        Returns how many were kept.
        """
        ctx, stats = self.ctx, self.ctx.stats[self.stage]
        why = {"prompt_hash": meta.get("prompt_hash")}
        rejected: list[dict[str, Any]] = []
        kept_records: list[dict[str, Any]] = []
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

    def _keep(self, cand: Candidate, decision: Decision, round_: int, meta: dict[str, Any]) -> dict[str, Any]:
        rec_id = f"{self.id_prefix}{self.count:06d}"
        self.kept.append((rec_id, cand.instruction))
        # The fields of `InstructionRecord.to_dict()`, built directly: `dataclasses.asdict` deep-copies
        # recursively and cost more than filtering the candidate.
        return {
            "id": rec_id,
            "instruction": cand.instruction,
            "round": round_,
            "origin": "machine",
            "is_classification": None,
            "instances": []
            if cand.instance is None
            else [{"input": cand.instance.input, "output": cand.instance.output}],
            "most_similar": dict(decision.nearest),
            "avg_similarity": decision.mean_f,
            "meta": meta if self.shard is None else {**meta, "shard": str(self.shard)},
        }

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
        self.template = ctx.prompts.get(self.stage)
        # `--shard i/N`: prompts show only this shard's seeds, so N jobs grow N independent pools
        shard = self.keeper.shard
        self.seeds = ctx.seeds if shard is None else shard.select(ctx.seeds, key=lambda s: s.id)
        if not self.seeds:
            raise UserError(f"--shard {shard}: no seed task falls into this shard; use fewer shards")
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


class Bootstrap(Growing):
    stage = "bootstrap"

    @property
    def asked_per_prompt(self) -> int:
        return self.ctx.cfg.new_per_prompt

    def request(self, round_: int, k: int) -> TeacherRequest:
        ctx, cfg, rng = self.ctx, self.ctx.cfg, self.rng
        machine = self.keeper.kept
        n_machine = min(cfg.num_machine_in_prompt, len(machine))
        n_seed = min(cfg.num_prompt_instructions - n_machine, len(self.seeds))
        shown = [(s.id, s.instruction, True) for s in rng.sample(self.seeds, n_seed)]
        shown += [(i, text, False) for i, text in rng.sample(machine, n_machine)]
        rng.shuffle(shown)
        tasks = numbered(shown_text(text) for _, text, _ in shown)
        demos = self.demos(shown) if ctx.chat else []
        messages, prompt = self.template.render(
            demos, tasks=tasks, next=len(shown) + 1, count=cfg.new_per_prompt
        )
        if ctx.chat:
            extra: dict[str, Any] = {
                "json_schema": instructions_schema(cfg.new_per_prompt, cfg.schema_max_chars)
            }
        else:
            end = (
                len(shown) + cfg.new_per_prompt + 1
            )  # the item a base model stops at ("16" in the reference)
            extra = {"stop": ["\n\n", f"\n{end}", f"{end}.", f"{end} ."]}
        tag = {
            "round": round_,
            "prompt_hash": prompt_hash(messages, prompt),
            "seed_ids": [i for i, _, is_seed in shown if is_seed],
            "machine_ids": [i for i, _, is_seed in shown if not is_seed],
        }
        sampling = ctx.sampling(self.stage, (round_, k), **extra)
        return TeacherRequest(messages=messages, prompt=prompt, sampling=sampling, tag=tag)

    def demos(self, shown: list[tuple[str, str, bool]]) -> list[Demo]:
        """One worked example from seeds not shown in this prompt: a shorter list and, as its answer,
        `new_per_prompt` other seed instructions in the JSON shape the parser reads."""
        cfg, taken = self.ctx.cfg, {i for i, _, _ in shown}
        others = [shown_text(s.instruction) for s in self.seeds if s.id not in taken]
        n_list = min(DEMO_LIST, len(others) // 2)
        n_answer = min(cfg.new_per_prompt, len(others) - n_list)
        if n_list < 1 or n_answer < 1:
            return []
        picked = self.rng.sample(others, n_list + n_answer)
        answer = json.dumps({"instructions": picked[n_list:]}, ensure_ascii=False)
        return [Demo({"tasks": numbered(picked[:n_list]), "count": n_answer}, answer)]

    def answer(self, response: TeacherResponse) -> int:
        tag = response.request.tag
        round_, where = tag["round"], {"prompt_hash": tag["prompt_hash"]}
        kept = 0
        for choice in response.choices:
            truncated = choice.finish_reason == "length"
            if not self.ctx.chat:
                if truncated:  # the reference discards a base model's completion that hit max_tokens
                    self.keeper.unreadable(choice.text, "truncated", round_, **where)
                    continue
                items = parse_continued_list(choice.text)
                if not items:
                    self.keeper.unreadable(choice.text, "unparseable", round_, **where)
            else:
                parsed = parse_instruction_list(choice.text, truncated=truncated)
                if parsed.unparseable:
                    self.keeper.unreadable(choice.text, "unparseable", round_, parsed.unparseable, **where)
                items = parsed.items
            candidates = [Candidate(text) for text in items]
            kept += self.keeper.offer(candidates, round_, self.provenance(tag), self.target)
        return kept


async def run(ctx: RunContext) -> None:
    await Bootstrap(ctx).run()
