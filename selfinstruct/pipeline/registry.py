"""The stage registry: every stage by name, the pipelines as lists of stage names, and running a pipeline.

To add a stage: write one module defining `STAGE = Stage(...)` (see `pipeline/stage.py`) plus its prompt
templates, and register it here (or from any module: `register(STAGE)`, then `register_pipeline(...)` or
insert it into a pipeline). Its decoding presets, template check, progress label, `[generate.<stage>]` table and
`--<stage>-temperature`-style flags follow from the declaration, also for a stage registered after the
`generate` settings were built (`on_register` hooks add its table then).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, create_model

from selfinstruct.config import Section, subtable
from selfinstruct.pipeline import alpaca, bootstrap, classify, instances, prepare
from selfinstruct.pipeline.stage import DECODING_KEYS, RunContext, Stage

STAGES: dict[str, Stage] = {}
PIPELINES: dict[str, tuple[str, ...]] = {}
PRESETS = ("reference", "chat")
_HOOKS: list[Callable[[Stage], None]] = []


def register(stage: Stage) -> Stage:
    """Make a stage known by its name (registering the same stage again is a no-op)."""
    if STAGES.get(stage.name, stage) is not stage:
        raise ValueError(f"another stage is already registered as {stage.name!r}")
    if stage.name not in STAGES:
        for hook in _HOOKS:  # a hook that refuses the stage (ValueError) leaves it unregistered
            hook(stage)
    STAGES[stage.name] = stage
    return stage


def on_register(hook: Callable[[Stage], None]) -> None:
    """Call `hook(stage)` for every stage registered from now on (settings built from the stages known at
    import time use it to learn of later ones)."""
    _HOOKS.append(hook)


def register_pipeline(name: str, stages: Sequence[str]) -> None:
    """A pipeline: registered stage names, run in this order."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"pipeline {name}: unknown stage {unknown[0]!r}")
    PIPELINES[name] = tuple(stages)


for _stage in (bootstrap.STAGE, alpaca.STAGE, classify.STAGE, instances.STAGE, prepare.STAGE):
    register(_stage)
register_pipeline("self-instruct", ("bootstrap", "classify", "instances", prepare.NAME))
register_pipeline("alpaca", ("alpaca", prepare.NAME))

CORPUS_STAGE = prepare.NAME
"""The stage whose counters hold `corpus_records`."""


def pipeline(name: str) -> tuple[Stage, ...]:
    return tuple(STAGES[s] for s in PIPELINES[name])


# ---------------------------------------------------------------- per-stage decoding settings

_LIMITS: dict[str, dict[str, Any]] = {
    "temperature": {"ge": 0},
    "top_p": {"gt": 0, "le": 1},
    "presence_penalty": {"ge": -2, "le": 2},
    "max_tokens": {"ge": 1},
}


def decoding_section(stage: Stage) -> type[Section]:
    """The `[generate.<stage>]` table: each decoding key optional, its help naming the stage's presets."""
    assert stage.decoding is not None
    fields: dict[str, Any] = {}
    for key in DECODING_KEYS:
        presets = ", ".join(f"{p} {stage.decoding[p][key]}" for p in PRESETS if p in stage.decoding)
        kind = int if key == "max_tokens" else float
        desc = f"{stage.name} {key.replace('_', ' ')} ({presets})"
        fields[key] = (kind | None, Field(None, description=desc, **_LIMITS[key]))
    return create_model(f"{stage.name.title()}Decoding", __base__=Section, **fields)


def decoding_field(stage: Stage) -> tuple[type[Section], Any]:
    """A teacher stage's `[generate.<stage>]` subtable (flags `--<stage>-…`): its type and field."""
    section = decoding_section(stage)
    return section, subtable(section, f"{stage.name} decoding", f"{stage.name}-")


def decoding_fields() -> dict[str, Any]:
    """One subtable field per registered teacher stage, for the `generate` command's settings model."""
    return {s.name: decoding_field(s) for s in STAGES.values() if s.uses_teacher}


def resolve_decoding(cfg: Any) -> dict[str, dict[str, Any]]:
    """Per-stage decoding: the stage's preset (auto = reference for base models, chat otherwise) + the
    explicit settings of its `[generate.<stage>]` table (`cfg.decoding_overrides`)."""
    preset = cfg.decoding
    if preset == "auto":
        preset = "reference" if cfg.teacher.api == "completions" else "chat"
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES.values():
        if stage.decoding is not None:
            out[stage.name] = {**stage.decoding[preset], **cfg.decoding_overrides(stage.name)}
    return out


# ---------------------------------------------------------------- running


async def run_pipeline(ctx: RunContext, stages: Sequence[str]) -> None:
    """Run the chosen stages in order; a stage that stops early (budget, Ctrl-C) stops the teacher stages
    after it, but a stage without a teacher (the corpus) still runs unless the run was interrupted."""
    for name in stages:
        stage = STAGES[name]
        if ctx.stop_reason is not None and (stage.uses_teacher or ctx.stop_reason == "interrupted"):
            continue
        await stage.run(ctx)
        ctx.on_tick(name)
