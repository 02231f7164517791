"""`selfinstruct generate`: grow an instruction corpus from seed tasks with a teacher LLM.

This module is the command's shell: settings (`GenerateConfig`), the run directory (identity check, resolved
config, state for resume), the live progress display, `summary.json`, Ctrl-C handling and the closing summary.
The stages themselves live in `selfinstruct.pipeline`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from selfinstruct.config import (
    MaxCost,
    MaxRequests,
    MaxTokens,
    PromptDir,
    Section,
    add_field,
    optional,
    save_config,
)
from selfinstruct.corpus import load_tasks_any
from selfinstruct.errors import UserError
from selfinstruct.filters import FilterConfig
from selfinstruct.pipeline.registry import (
    CORPUS_STAGE,
    PIPELINES,
    STAGES,
    decoding_field,
    decoding_fields,
    on_register,
    pipeline,
    resolve_decoding,
    run_pipeline,
)
from selfinstruct.pipeline.runner import Budget, Journal
from selfinstruct.pipeline.session import exit_code, teacher_session
from selfinstruct.pipeline.stage import DECODING_KEYS, RunContext, Stage, StageStats
from selfinstruct.prompts import Prompts
from selfinstruct.rundir import CONFIG, CORPUS, INSTRUCTIONS, JOURNALED, REJECTED, STATE, SUMMARY, Summary
from selfinstruct.shard import ShardSpec, shard_field
from selfinstruct.store import RunDir, atomic_write_json, read_jsonl
from selfinstruct.teachers import Teacher, TeacherConfig, make_teacher

SUMMARY_EVERY_S = 2.0
LOG_EVERY_S = 10.0  # progress lines when stderr is not a terminal


_STAGE_TABLES = decoding_fields()
_StageDecoding = create_model("_StageDecoding", __base__=Section, **_STAGE_TABLES)
"""One `[generate.<stage>]` table (flags `--<stage>-temperature` …) per registered teacher stage."""


class GenerateConfig(_StageDecoding):
    seeds: str = Field(
        "seeds/seed_tasks.jsonl",
        description="seed tasks: self-instruct seed JSONL or Alpaca JSON/JSONL",
        json_schema_extra={"positional": True},
    )
    out: str = Field("outputs/run", description="run directory (rerun the same command on it to resume)")
    pipeline: str = Field(
        "self-instruct",
        description="self-instruct: 4 stages; alpaca: one step yields complete tasks {"
        + ",".join(PIPELINES)
        + "}",
    )
    stages: list[str] = Field(
        [],
        description="stages to run, in pipeline order (default all: bootstrap,classify,instances,finetune | alpaca,finetune)",
    )
    num_instructions: int = Field(1000, ge=1, description="instructions to keep (reference: 52k)")
    seed: int = Field(0, description="random seed for prompt sampling and per-request teacher seeds")
    # prompt mix
    num_prompt_instructions: int = Field(8, ge=1, description="bootstrap: example instructions per prompt")
    num_machine_in_prompt: int = Field(
        2, ge=0, description="bootstrap: how many of them are sampled from kept machine instructions"
    )
    new_per_prompt: int = Field(
        7,
        ge=1,
        description="bootstrap: new instructions per prompt (a base model's list stops at the item after)",
    )
    alpaca_prompt_tasks: int = Field(3, ge=1, description="alpaca: seed tasks shown per prompt")
    alpaca_new_tasks: int = Field(
        20, ge=1, description="alpaca: new tasks asked for per prompt (reference 16)"
    )
    request_batch: int | None = Field(
        None,
        ge=1,
        description="prompts per teacher call (default: 1, each answer handled as it arrives; the teacher batches what is in flight)",
    )
    # decoding
    decoding: Literal["auto", "reference", "chat"] = Field(
        "auto", description="decoding preset: auto = reference for --api completions, chat otherwise"
    )
    classify_scoring: Literal["label", "logprob"] = Field(
        "logprob",
        description="classify: logprob = compare the teacher's P(yes) and P(no) for the first token (one "
        "1-token request); label = parse the answer it writes (the reference)",
    )
    classify_calibrate: bool = Field(
        True,
        description="classify, logprob scoring: subtract the mean score of content-free tasks (contextual "
        "calibration), so the prompt's lean towards one answer does not decide",
    )
    # instances and corpus
    max_instances: int = Field(5, ge=1, description="instances per task")
    schema_max_chars: int | None = optional(
        "structured output: longest string allowed in the JSON answers (maxLength; vLLM honours it, OpenAI's "
        "strict mode rejects it)",
        ge=1,
    )
    include_seeds: bool = Field(False, description="also put the seed tasks into corpus.jsonl")
    drop_repetitive: bool = Field(
        True,
        description="finetune: drop instances whose input or output loops on itself (not a reference rule)",
    )
    instance_rules: bool = Field(
        True,
        description="finetune: apply the reference Self-Instruct instance rules (drop instances with an empty "
        "output, input = output or a ':' ending, then tasks whose instances disagree on one input); "
        "--no-instance-rules keeps them, as the reference Alpaca does",
    )
    # budget and stopping
    max_requests: MaxRequests = None
    max_tokens: MaxTokens = None
    max_cost: MaxCost = None
    patience: int = Field(
        200, ge=1, description="stop growing after this many answers in a row without a kept instruction"
    )
    prompt_dir: PromptDir = None
    shard: ShardSpec = shard_field(
        "work: seed tasks the bootstrap/alpaca prompts show, instructions classify/instances answer"
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher LLM")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="heuristic and novelty filters")

    @model_validator(mode="before")
    @classmethod
    def _flat_decoding_keys(cls, data: Any) -> Any:
        """`bootstrap_temperature = 0.7` (the flat spelling of earlier versions) means `[generate.bootstrap]`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in [k for k in data if isinstance(k, str)]:
            stage, _, name = key.partition("_")
            if name in DECODING_KEYS and stage in cls.model_fields and stage in STAGES:
                data[stage] = {**dict(data.get(stage) or {}), name: data.pop(key)}
        return data

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.num_machine_in_prompt > self.num_prompt_instructions:
            raise ValueError("num_machine_in_prompt must not exceed num_prompt_instructions")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline '{self.pipeline}' ({', '.join(PIPELINES)})")
        known = PIPELINES[self.pipeline]
        for stage in self.stages:
            if stage not in known:
                raise ValueError(
                    f"'{stage}' is not a stage of the {self.pipeline} pipeline ({', '.join(known)})"
                )
        return self

    def chosen_stages(self) -> list[str]:
        return [s for s in PIPELINES[self.pipeline] if not self.stages or s in self.stages]

    def decoding_overrides(self, stage: str) -> dict[str, Any]:
        """The decoding values set in `[generate.<stage>]` or by `--<stage>-…` flags."""
        if stage not in type(self).model_fields:
            return {}  # a settings object made before its stage was registered
        section = getattr(self, stage)
        return section.model_dump(exclude_none=True) if isinstance(section, Section) else {}


def _late_stage_table(stage: Stage) -> None:
    """A teacher stage registered after this module was imported (from outside the package) gets its
    `[generate.<stage>]` table and `--<stage>-…` flags like a built-in one; a name a setting already uses is
    refused, so no stage can shadow one."""
    if not stage.uses_teacher:
        return
    if stage.name in GenerateConfig.model_fields and stage.name not in _STAGE_TABLES:
        raise ValueError(f"stage name {stage.name!r} is a generate setting; choose another name")
    _STAGE_TABLES[stage.name] = decoding_field(stage)
    add_field(GenerateConfig, stage.name, *_STAGE_TABLES[stage.name])


on_register(_late_stage_table)


# ---------------------------------------------------------------- run directory identity and state


def _identity(cfg: GenerateConfig) -> dict[str, Any]:
    seeds = Path(cfg.seeds)
    return {
        "pipeline": cfg.pipeline,
        "seeds": str(seeds),
        "seeds_sha256": hashlib.sha256(seeds.read_bytes()).hexdigest(),
    }


def open_state(
    run: RunDir, identity: dict[str, Any], kind: str, mismatch: Callable[[dict[str, Any]], str | None]
) -> dict[str, Any]:
    """Load state.json, or start one for an empty directory. `mismatch(old identity)` says why this run
    directory belongs to another run (one line for the user), or None; a non-empty directory without state is
    refused, so a command never writes into files it did not make."""
    path = run / STATE
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable run state ({e}); use another --out") from None
        problem = mismatch(state.get("identity", {}))
        if problem:
            raise UserError(problem)
        return state
    foreign = sorted(p.name for p in run.path.iterdir() if p.name != ".lock")
    if foreign:
        raise UserError(f"{run.path} is not empty and is not {kind} ({foreign[0]}, …); use another --out")
    return {"identity": identity, "usage": {}, "elapsed_s": 0.0, "sessions": 0}


def _mismatch(run: RunDir, identity: dict[str, Any]) -> Callable[[dict[str, Any]], str | None]:
    """Why a run directory belongs to another generate run: another pipeline or other seeds."""

    def check(old: dict[str, Any]) -> str | None:
        if old.get("pipeline") != identity["pipeline"]:
            return f"{run.path} holds a {old.get('pipeline')} run; --pipeline {identity['pipeline']} needs another --out"
        if old.get("seeds_sha256") != identity["seeds_sha256"]:
            return (
                f"{run.path} was generated from other seeds ({old.get('seeds')}); use the same seeds to resume "
                "or another --out"
            )
        return None

    return check


def _initial_stats(run: RunDir, cfg: GenerateConfig) -> dict[str, StageStats]:
    """Counters derived from the files, so a resumed run (even after kill -9) reports the whole run."""
    stats = {stage: StageStats() for stage in PIPELINES[cfg.pipeline]}
    for rec in read_jsonl(run / REJECTED):
        stage = stats.get(rec.get("stage"))
        if stage is not None:
            stage.rejected[rec.get("reason", "?")] += 1
    first = PIPELINES[cfg.pipeline][0]
    kept = sum(1 for _ in read_jsonl(run / INSTRUCTIONS))
    for name, s in stats.items():
        s.parse_failures = s.rejected["unparseable"]
        if name == first:
            s.done = kept
            s.candidates = kept + sum(
                n for r, n in s.rejected.items() if r not in ("unparseable", "truncated")
            )
    if (run / CORPUS).exists() and CORPUS_STAGE in stats:
        stats[CORPUS_STAGE].extra["corpus_records"] = sum(1 for _ in read_jsonl(run / CORPUS))
    return stats


# ---------------------------------------------------------------- progress and summary


class Monitor:
    """The live progress display (stderr) and the periodic, atomic summary.json."""

    def __init__(self, ctx: RunContext, state: dict[str, Any], console: Console):
        self.ctx, self.state, self.console = ctx, state, console
        self.started = time.monotonic()
        self.interactive = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self.tasks: dict[str, Any] = {}
        self._last_summary = self._last_log = self._last_draw = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self._stage_start: dict[str, tuple[float, int]] = {}  # (time, done) when a stage was first shown

    def __enter__(self) -> Monitor:
        if self.interactive:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.interactive:
            self.progress.stop()

    def tick(self, stage: str) -> None:
        now = time.monotonic()
        stats = self.ctx.stats[stage]
        if now - self._last_draw >= 0.1 or stats.done >= stats.total:
            self._last_draw = now
            self._draw(stage, now)
        if now - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = now
            self.ctx.journal.snapshot(SUMMARY, self.summary(final=False))
            self.save_state()

    def _draw(self, stage: str, now: float) -> None:
        s = self.ctx.stats[stage]
        usage = self.ctx.budget.total()
        t0, r0 = self._rate_mark
        if now - t0 >= 2.0:
            self._rate = (usage.requests - r0) / (now - t0)
            self._rate_mark = (now, usage.requests)
        rejected = ", ".join(f"{r} {n}" for r, n in s.rejected.most_common(3)) or "none"
        info = (
            f"rejected: {rejected} · parse fail {s.parse_failures} · "
            f"{usage.prompt_tokens + usage.completion_tokens:,} tok · ${usage.cost:.2f} · {self._rate:.1f} req/s"
        )
        label = self.label(stage)
        if self.interactive:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(f"{stage} ({label})", total=s.total, info=info)
            self.progress.update(self.tasks[stage], completed=s.done, total=s.total, info=info)
        elif now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            t0, done0 = self._stage_start.setdefault(stage, (now, s.done))
            eta = ""
            if s.done > done0 and s.total > s.done:
                eta = f" · ETA {(s.total - s.done) * (now - t0) / (s.done - done0):.0f} s"
            self.console.print(
                f"[{stage}] {label} {s.done}/{s.total} · {info}{eta}", highlight=False, markup=False
            )

    def teacher_usage(self) -> dict[str, Any]:
        """The whole run's teacher accounting, as every summary.json reports it."""
        u = self.ctx.budget.total()
        return {
            "requests": u.requests,
            "failed_requests": u.failed_requests,
            "retries": u.retries,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cost": round(u.cost, 6),
        }

    def label(self, stage: str) -> str:
        """What a stage's progress counts: kept instructions (a growing stage) or items done."""
        grows = stage in STAGES and STAGES[stage].grows
        return "kept" if grows else "done"

    def save_state(self) -> None:
        """Write state.json now (a stage cached something in it), after every record journaled so far."""
        self.ctx.journal.snapshot(STATE, self.state_snapshot())

    def state_snapshot(self) -> dict[str, Any]:
        usage = self.ctx.budget.total()
        return {**self.state, "usage": vars(usage), "elapsed_s": self.elapsed()}

    def elapsed(self) -> float:
        return round(self.state.get("elapsed_s", 0.0) + time.monotonic() - self.started, 3)

    def summary(self, final: bool) -> Summary:
        ctx = self.ctx
        cfg = ctx.cfg
        first = PIPELINES[cfg.pipeline][0]
        rejected: Counter[str] = Counter()
        for s in ctx.stats.values():
            rejected.update(s.rejected)
        return Summary(
            pipeline=cfg.pipeline,
            teacher_model=cfg.teacher.model,
            target=cfg.num_instructions,
            kept=ctx.stats[first].done,
            rejected_by_reason=dict(rejected.most_common()),
            parse_failures=sum(s.parse_failures for s in ctx.stats.values()),
            candidates=ctx.stats[first].candidates,
            **self.teacher_usage(),
            elapsed_s=self.elapsed(),
            corpus_records=ctx.stats[CORPUS_STAGE].extra.get("corpus_records", 0)
            if CORPUS_STAGE in ctx.stats
            else 0,
            stages={name: s.to_dict() for name, s in ctx.stats.items()},
            finished=final and all(ctx.stats[name].finished for name in cfg.chosen_stages()),
            stop_reason=ctx.stop_reason,
            sessions=self.state.get("sessions", 1),
        )

    def write_final(self, run: RunDir) -> Summary:
        """The session's last `summary.json` and `state.json` (after the journal is closed); the summary."""
        summary = self.summary(final=True)
        atomic_write_json(run / SUMMARY, summary)
        atomic_write_json(run / STATE, self.state_snapshot())
        return summary

    def print_final(self, summary: Summary, run: RunDir) -> None:
        """The closing summary; names, paths and reasons are printed as plain text (no rich markup)."""

        def line(text: str) -> None:
            c.print(text, markup=False, highlight=False)

        c = self.console
        c.print()
        status = "finished" if summary["finished"] else f"stopped ({summary['stop_reason'] or 'incomplete'})"
        c.print(
            Text.assemble(
                (f"generate {status}", "bold"), f": {summary['pipeline']} with {summary['teacher_model']}"
            )
        )
        line(
            f"  kept          {summary['kept']} / {summary['target']} instructions ({summary['candidates']} candidates)"
        )
        for name in self.ctx.cfg.chosen_stages():
            st = summary["stages"][name]
            line(
                f"  {name:<13} {st['done']} / {st['total']}" + ("" if st["finished"] else "  (not finished)")
            )
        if summary["rejected_by_reason"]:
            line("  rejected      " + ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items()))
        line(
            f"  teacher       {summary['requests']} requests ({summary['failed_requests']} failed, "
            f"{summary['retries']} retries), {summary['prompt_tokens'] + summary['completion_tokens']:,} tokens, "
            f"${summary['cost']:.4f}, {summary['elapsed_s']:.1f} s"
        )
        line(f"  corpus        {summary['corpus_records']} records")
        for name in (INSTRUCTIONS, REJECTED, CORPUS, SUMMARY):
            if (run / name).exists():
                line(f"  {name:<20} {run / name}")
        if summary["stop_reason"] == "interrupted" or not summary["finished"]:
            line("  rerun the same command to continue")


# ---------------------------------------------------------------- the command


def run_generate(
    cfg: GenerateConfig, *, teacher: Teacher | None = None, console: Console | None = None
) -> int:
    """Run (or resume) the pipeline in `cfg.out`. `teacher`: an already started teacher to use (tests, notebooks).

    Returns the exit code: 0 when finished or stopped by a budget cap, 130 when interrupted by Ctrl-C (SIGINT),
    143 (128 + 15, the shell's convention) when stopped by SIGTERM.
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    seeds = load_tasks_any(cfg.seeds)
    stages = cfg.chosen_stages()
    prompts = Prompts("chat" if cfg.teacher.api == "chat" else "completion", cfg.prompt_dir)
    for stage in stages:  # fail on a bad template before any request is sent
        for name, v in STAGES[stage].templates.items():
            if prompts.style in v.styles:
                prompts.get(name)
    identity = _identity(cfg)
    with RunDir(cfg.out) as run:
        state = open_state(run, identity, "a generate run", _mismatch(run, identity))
        if cfg.shard is not None:  # `merge` counts a copied base run's usage once, not once per shard
            if state.setdefault("shard", cfg.shard) != cfg.shard:
                raise UserError(
                    f"{run.path} holds shard {state['shard']}; --shard {cfg.shard} needs another --out"
                )
            state.setdefault("usage_before_shard", dict(state.get("usage", {})))
        state["sessions"] = state.get("sessions", 0) + 1
        atomic_write_json(run / STATE, state)
        save_config("generate", cfg, run / CONFIG)
        own_teacher = teacher is None
        the_teacher = teacher or make_teacher(cfg.teacher)
        journal = Journal(run, JOURNALED)
        ctx = RunContext(
            cfg=cfg,
            run=run,
            seeds=seeds,
            teacher=the_teacher,
            prompts=prompts,
            journal=journal,
            budget=Budget.resumed(cfg, state.get("usage", {}), the_teacher.stats),
            decoding=resolve_decoding(cfg),
            stats=_initial_stats(run, cfg),
            pipeline=pipeline(cfg.pipeline),
            state=state,
        )
        monitor = Monitor(ctx, state, console)
        ctx.on_tick, ctx.save_state = monitor.tick, monitor.save_state
        try:
            with monitor:
                asyncio.run(_session(ctx, stages, own_teacher, console))
        finally:
            journal.close()
            summary = monitor.write_final(run)
        monitor.print_final(summary, run)
    return exit_code(ctx)


async def _session(ctx: RunContext, stages: list[str], own_teacher: bool, console: Console) -> None:
    async with teacher_session(ctx, own_teacher, console):
        await run_pipeline(ctx, stages)
