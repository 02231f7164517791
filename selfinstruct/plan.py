"""`selfinstruct plan [--sample N] generate|evolve FLAGS…`: requests, tokens, cost and time, before running.

`--max-cost` stops a run once the money is spent; `plan` says beforehand how much that will be. It builds the
real stages of the planned command on a scratch copy of the run state and renders a sample of their real
requests (the pipeline's own prompt code, the run's own templates and decoding), so every prompt token is
counted as it will be sent. Prompt tokens are counted with the model's tokenizer: tiktoken for OpenAI model
names when it is installed, else the Hugging Face tokenizer when the model resolves to a local directory, else
~4 characters per token (the plan says which). Completion tokens per request come, in this order of trust,
from the usage the run directory already observed for the stage (summary.json), else from an answer of the
expected shape built from the seed tasks (what the prompts' own demonstrations answer), capped at max_tokens;
the high estimate is every answer running to max_tokens. Growing stages (bootstrap, alpaca) need as many
requests as the instructions still wanted divided by the yield per answer: observed, else the pipeline's own
prior (half of what a prompt asks for); low assumes every asked item is kept, high half the expected yield.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from rich.console import Console
from rich.table import Table
from rich.text import Text

from selfinstruct.config import Section, add_arguments, optional, resolve
from selfinstruct.errors import UserError
from selfinstruct.shard import Shard
from selfinstruct.store import read_jsonl

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
"""Tokens a chat message costs beyond its content (role and separators; OpenAI's rule of thumb)."""
DEFAULT_LATENCY_S = 1.0
DECODE_TOKENS_PER_S = 50.0
"""Assumed per-request speed when no run was observed: 1 s to first token, then 50 tokens/s."""


class PlanConfig(Section):
    sample: int = Field(20, ge=1, description="requests per stage to render and count")
    latency: float | None = optional(
        "seconds one request takes (default: observed in the run directory, else 1 s + 50 tokens/s)", gt=0
    )
    as_json: bool = Field(
        False, description="print the plan as JSON instead of a table", json_schema_extra={"flag": "--json"}
    )


# ---------------------------------------------------------------- token counting


class TokenCounter:
    """Counts tokens of requests and answers the way the teacher's model does, as far as it can know."""

    def __init__(self, model: str, in_process: bool):
        self.count: Callable[[str], int] = self._approx
        self.chat: Callable[[list[dict[str, str]]], int] | None = None
        self.method = f"~{CHARS_PER_TOKEN} characters per token (no tokenizer found for {model!r})"
        if not in_process and self._tiktoken(model):
            return
        self._huggingface(model, in_process)

    @staticmethod
    def _approx(text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0

    def _tiktoken(self, model: str) -> bool:
        try:
            import tiktoken

            encoding = tiktoken.encoding_for_model(model.rsplit("/", 1)[-1])
        except Exception:  # not installed, not an OpenAI name, or its BPE file cannot be fetched offline
            return False
        self.count = lambda text: len(encoding.encode(text, disallowed_special=()))
        self.method = f"tiktoken ({encoding.name})"
        return True

    def _huggingface(self, model: str, in_process: bool) -> None:
        """Only models that are already on this machine: planning never downloads."""
        try:
            from selfinstruct.models import resolve_model

            path = Path(model) if Path(model).is_dir() else None
            if path is None and in_process:
                path = Path(resolve_model(model))
            if path is None:
                return
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception:
            return
        self.count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
        if getattr(tok, "chat_template", None):
            self.chat = lambda messages: len(
                tok.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        self.method = f"Hugging Face tokenizer of {path}"

    def request(self, messages: list[dict[str, str]] | None, prompt: str | None) -> int:
        if messages is None:
            return self.count(prompt or "")
        if self.chat is not None:
            return int(self.chat(messages))
        return sum(self.count(m["content"]) + MESSAGE_OVERHEAD for m in messages)


# ---------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    stage: str
    requests: tuple[int, int, int]  # low, expected, high
    prompt_tokens: float  # per request
    completion_tokens: tuple[float, float, float]  # per request: low, expected, high
    completion_source: str
    seconds: float
    note: str = ""
    # `--batch-api`: batches this stage sends one after another (each waits for the last)
    batch_steps: int = 0

    def totals(self, prices: tuple[float, float], discount: float) -> dict[str, Any]:
        low_r, exp_r, high_r = self.requests
        low_c, exp_c, high_c = self.completion_tokens
        tokens = {
            "low": (low_r * self.prompt_tokens, low_r * low_c),
            "expected": (exp_r * self.prompt_tokens, exp_r * exp_c),
            "high": (high_r * self.prompt_tokens, high_r * high_c),
        }
        cost = {k: discount * (p * prices[0] + c * prices[1]) / 1e6 for k, (p, c) in tokens.items()}
        return {
            "stage": self.stage,
            "requests": dict(zip(("low", "expected", "high"), self.requests, strict=True)),
            "prompt_tokens_per_request": round(self.prompt_tokens, 1),
            "completion_tokens_per_request": dict(
                zip(("low", "expected", "high"), (round(x, 1) for x in self.completion_tokens), strict=True)
            ),
            "completion_source": self.completion_source,
            "prompt_tokens": round(tokens["expected"][0]),
            "completion_tokens": round(tokens["expected"][1]),
            "tokens": {k: round(p + c) for k, (p, c) in tokens.items()},
            "cost": {k: round(v, 6) for k, v in cost.items()},
            "seconds": round(self.seconds, 1),
            "note": self.note,
        }


def _observed(out: Path) -> dict[str, dict[str, Any]]:
    """Per-stage counts of the run directory's last session (summary.json), when it has any."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {name: st for name, st in summary.get("stages", {}).items() if st.get("requests")}


def _seconds(
    teacher: Any,
    requests: int,
    tokens_per_request: float,
    completion: float,
    observed: dict,
    latency: float | None,
) -> float:
    """Wall time at the configured concurrency, RPM and TPM: whichever limit binds."""
    concurrency = teacher.concurrency_or_default
    if latency is not None:
        pass
    elif observed.get("requests") and observed.get("elapsed_s"):
        # what one request took in the observed session, with that session's concurrency
        latency = observed["elapsed_s"] * concurrency / observed["requests"]
    else:
        latency = DEFAULT_LATENCY_S + completion / DECODE_TOKENS_PER_S
    limits = [requests * latency / concurrency]
    if teacher.rpm:
        limits.append(requests / teacher.rpm * 60)
    if teacher.tpm:
        limits.append(requests * tokens_per_request / teacher.tpm * 60)
    return max(limits)


def plan_generate(cfg: Any, sample: int, latency: float | None = None) -> dict[str, Any]:
    """The plan of `selfinstruct generate` with `cfg` (a `GenerateConfig`), as a JSON-ready dict."""
    from selfinstruct.corpus import load_tasks_any
    from selfinstruct.pipeline.registry import resolve_decoding
    from selfinstruct.rundir import CLASSIFICATION, INSTANCES, INSTRUCTIONS

    seeds = load_tasks_any(cfg.seeds)
    out = Path(cfg.out)
    observed = _observed(out)
    counter = TokenCounter(cfg.teacher.model, cfg.teacher.in_process)
    decoding = resolve_decoding(cfg)
    chat = cfg.teacher.api == "chat"
    rng = random.Random(f"{cfg.seed}:plan")

    def lines_of(name: str) -> list[dict[str, Any]]:
        return list(read_jsonl(out / name)) if (out / name).exists() else []

    instructions = lines_of(INSTRUCTIONS)
    kept = len({r["id"] for r in instructions})
    with tempfile.TemporaryDirectory(prefix="selfinstruct-plan-") as scratch:
        requests_by_stage, calibration = _render(cfg, seeds, Path(scratch), out, sample)
    stages: list[StagePlan] = []
    growing = {"bootstrap": cfg.new_per_prompt, "alpaca": cfg.alpaca_new_tasks}
    shard = Shard.parse(getattr(cfg, "shard", None))
    for stage in cfg.chosen_stages():
        if stage == "finetune":
            continue
        rendered = requests_by_stage[stage]
        prompt_mean = sum(counter.request(r.messages, r.prompt) for r in rendered) / max(1, len(rendered))
        max_tokens = decoding[stage]["max_tokens"]
        seen = observed.get(stage, {})
        if stage in growing:
            remaining = max(0, cfg.num_instructions - kept)
            asked = growing[stage]
            if seen.get("requests") and seen.get("done"):
                expected_yield, source = seen["done"] / seen["requests"], "observed"
            else:
                expected_yield, source = asked / 2, "prior"
            requests = (
                math.ceil(remaining / asked),
                math.ceil(remaining / expected_yield),
                math.ceil(remaining / (expected_yield / 2)),
            )
            note = f"yield {expected_yield:.2f} kept per answer ({source})"
            # a batch holds at most --concurrency prompts built from the pool as it stands
            steps = math.ceil(requests[1] / cfg.teacher.concurrency_or_default)
        else:
            done = len(read_keyed_path(out, CLASSIFICATION if stage == "classify" else INSTANCES))
            # after a growing stage of this same run, every instruction it is to keep gets an answer
            grows = any(s in growing for s in cfg.chosen_stages())
            todo = max(0, (max(kept, cfg.num_instructions) if grows else kept) - done)
            if shard is not None and not grows:  # a sharded bootstrap answers all of its own records
                todo = math.ceil(todo / shard.count)
            note = f"{todo} instructions to answer"
            if todo and calibration[stage]:
                note += f" + {calibration[stage]} calibration requests"
                todo += calibration[stage]
            requests = (todo, todo, todo)
            steps = 1 if todo else 0  # every instruction in one batch
        if seen.get("requests") and seen.get("completion_tokens"):
            expected_c = seen["completion_tokens"] / seen["requests"]
            source_c = "observed"
        else:
            answers = [counter.count(a) for a in _expected_answers(stage, cfg, seeds, chat, rng, sample)]
            expected_c = min(max_tokens, sum(answers) / max(1, len(answers)))
            source_c = "expected answer shape"
        completion = (expected_c / 2, expected_c, float(max_tokens))
        seconds = _seconds(cfg.teacher, requests[1], prompt_mean + expected_c, expected_c, seen, latency)
        stages.append(StagePlan(stage, requests, prompt_mean, completion, source_c, seconds, note, steps))
    return _assemble("generate", cfg, counter, stages, bool(observed))


def _assemble(command: str, cfg: Any, counter: TokenCounter, stages: list[StagePlan], observed: bool) -> dict:
    """Prices (Batch API: half), per-stage totals and the grand total."""
    from selfinstruct.teachers.openai_compat import BATCH_DISCOUNT, BATCH_WINDOW_H
    from selfinstruct.teachers.pricing import resolve_prices

    prices = resolve_prices(cfg.teacher.model, cfg.teacher.price_input, cfg.teacher.price_output)
    batch = bool(getattr(cfg.teacher, "batch_api", False))
    discount = BATCH_DISCOUNT if batch else 1.0
    rows = [s.totals(prices, discount) for s in stages]
    total = {
        "requests": sum(r["requests"]["expected"] for r in rows),
        "tokens": {k: sum(r["tokens"][k] for r in rows) for k in ("low", "expected", "high")},
        "cost": {k: round(sum(r["cost"][k] for r in rows), 6) for k in ("low", "expected", "high")},
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }
    if batch:  # no concurrency-based time: each batch answers within the window, one after another
        for row, stage in zip(rows, stages, strict=True):
            row["batch_steps"], row["seconds"] = stage.batch_steps, None
        total["batch_steps"], total["seconds"] = sum(s.batch_steps for s in stages), None
        total["max_seconds"] = total["batch_steps"] * BATCH_WINDOW_H * 3600
    return {
        "command": command,
        "model": cfg.teacher.model,
        "tokenizer": counter.method,
        "prices_per_1m": {"input": prices[0] * discount, "output": prices[1] * discount},
        "batch_api": batch,
        "batch_window_h": BATCH_WINDOW_H if batch else None,
        "observed_run": observed,
        "stages": rows,
        "total": total,
    }


def read_keyed_path(out: Path, name: str) -> set[str]:
    return {r["id"] for r in read_jsonl(out / name)} if (out / name).exists() else set()


def _render(
    cfg: Any, seeds: list, scratch: Path, out: Path, sample: int
) -> tuple[dict[str, list], dict[str, int]]:
    """`sample` real requests per stage, built by the stages themselves on a scratch run directory that holds
    (a sample of) the run's instructions and labels, or seed tasks standing in for them before any exist; and
    per stage the requests it sends once before its items (classify's calibration, unless the run's state
    already holds it)."""
    import asyncio

    from selfinstruct.pipeline.registry import resolve_decoding
    from selfinstruct.pipeline.runner import Journal
    from selfinstruct.rundir import CLASSIFICATION, INSTRUCTIONS

    run_dir = scratch / "run"
    run_dir.mkdir()
    if (out / INSTRUCTIONS).exists():
        shutil.copy(out / INSTRUCTIONS, run_dir / INSTRUCTIONS)
        if (out / CLASSIFICATION).exists():
            shutil.copy(out / CLASSIFICATION, run_dir / CLASSIFICATION)
    stand_ins = [
        {"id": f"plan_{i}", "instruction": s.instruction, "is_classification": s.is_classification}
        for i, s in enumerate(seeds[: max(sample, 1)])
    ]
    with (run_dir / INSTRUCTIONS).open("a", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "round": 0}) + "\n" for r in stand_ins)
    with (run_dir / CLASSIFICATION).open("a", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"id": r["id"], "is_classification": r["is_classification"]}) + "\n" for r in stand_ins
        )
    out_requests: dict[str, list] = {}
    once: dict[str, int] = {}
    try:
        state = json.loads((out / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        state = {}
    with _scratch_context(cfg, run_dir, seeds, resolve_decoding(cfg), cfg.chosen_stages(), Journal) as ctx:
        ctx.state = state
        for stage in cfg.chosen_stages():
            if stage != "finetune":
                out_requests[stage], once[stage] = asyncio.run(_stage_requests(ctx, stage, sample))
    return out_requests, once


@contextlib.contextmanager
def _scratch_context(
    cfg: Any, run_dir: Path, seeds: list, decoding: dict, stages: Sequence[str], journal_type: type
) -> Iterator[Any]:
    """A `RunContext` on a scratch run directory with a teacher that renders and never answers."""
    from selfinstruct.pipeline import JOURNALED, RunContext, StageStats
    from selfinstruct.pipeline.runner import Budget
    from selfinstruct.prompts import Prompts
    from selfinstruct.store import RunDir
    from selfinstruct.teachers.base import Teacher, TeacherStats, Totals

    class Offline(Teacher):
        """Renders, never answers: the request shapes depend only on the config."""

        async def generate(self, requests: Sequence[Any]) -> list[Any]:
            raise AssertionError("plan never calls the teacher")

    teacher = Offline(cfg.teacher)
    prompts = Prompts("chat" if cfg.teacher.api == "chat" else "completion", cfg.prompt_dir)
    with RunDir(run_dir) as run:
        journal = journal_type(run, JOURNALED)
        try:
            yield RunContext(
                cfg=cfg,
                run=run,
                seeds=seeds,
                teacher=teacher,
                prompts=prompts,
                journal=journal,
                budget=Budget(None, None, None, Totals(), TeacherStats(), Totals()),
                decoding=decoding,
                stats={s: StageStats() for s in stages},
            )
        finally:
            journal.close()


async def _stage_requests(ctx: Any, stage: str, sample: int) -> tuple[list, int]:
    from selfinstruct.pipeline import INSTRUCTIONS, read_keyed
    from selfinstruct.pipeline.alpaca import Alpaca
    from selfinstruct.pipeline.bootstrap import Bootstrap
    from selfinstruct.pipeline.classify import Classify
    from selfinstruct.pipeline.instances import Instances

    source = {"bootstrap": Bootstrap, "alpaca": Alpaca, "classify": Classify, "instances": Instances}[stage](
        ctx
    )
    if stage in ("bootstrap", "alpaca"):
        return [source.request(0, k) for k in range(sample)], 0
    items = [(i, rec["instruction"]) for i, rec in read_keyed(ctx.run, INSTRUCTIONS).items()]
    # the scratch file holds the run's own instructions first: prefer them to the stand-ins
    real = [item for item in items if not item[0].startswith("plan_")] or items
    picked = random.Random(0).sample(real, min(sample, len(real)))
    return [source.request(*item) for item in picked], len(getattr(source, "unsent", ()))


def _expected_answers(stage: str, cfg: Any, seeds: list, chat: bool, rng: random.Random, n: int) -> list[str]:
    """Answers of the shape the stage asks for, built from seed tasks: what a compliant teacher writes."""
    from selfinstruct.pipeline.alpaca import task_list
    from selfinstruct.pipeline.instances import as_json, format_examples
    from selfinstruct.pipeline.stage import numbered

    out = []
    for _ in range(n):
        if stage == "classify":
            label = rng.random() < 0.5
            out.append(json.dumps({"is_classification": label}) if chat else (" Yes" if label else " No"))
        elif stage == "bootstrap":
            picked = [s.instruction for s in rng.choices(seeds, k=cfg.new_per_prompt)]
            out.append(json.dumps({"instructions": picked}, ensure_ascii=False) if chat else numbered(picked))
        elif stage == "alpaca":
            picked = rng.choices(seeds, k=cfg.alpaca_new_tasks)
            if chat:
                tasks = [
                    {
                        "instruction": t.instruction,
                        "input": t.instances[0].input,
                        "output": t.instances[0].output,
                    }
                    for t in picked
                ]
                out.append(json.dumps({"tasks": tasks}, ensure_ascii=False))
            else:
                out.append(task_list(picked))
        else:  # instances: a seed task's instances, scaled to the number asked for
            task = rng.choice([s for s in seeds if s.instances] or seeds)
            output_first = bool(task.is_classification)
            text = as_json(task, output_first) if chat else format_examples(task, output_first)
            scale = cfg.max_instances / max(1, len(task.instances))
            out.append(text * max(1, round(scale)) if scale >= 1 else text[: int(len(text) * scale)])
    return out


# ---------------------------------------------------------------- the command


def plan_evolve(cfg: Any, sample: int, latency: float | None = None) -> dict[str, Any]:
    """The plan of `selfinstruct evolve`: per step (evolve, judge, answer), the attempts still to decide.

    Every attempt sends one rewrite request; the judge and answer requests only follow a rewrite that passed
    the cheaper eliminations, so *low* counts rewrites only and *expected* every step of every attempt (or the
    requests per decided attempt the run directory observed). Completion shapes: the parent record rewritten
    (a rewrite of similar length), a judge verdict, the record's output as the answer."""
    from selfinstruct.evolve import (
        Attempt,
        DurableJournal,
        Evolver,
        Node,
        draw_op,
        evolve_decoding,
        format_task,
        load_input,
        restore,
    )

    if not cfg.input:
        raise UserError("evolve needs an INPUT: a run directory or a corpus file")
    records, _ = load_input(cfg.input)
    records = records[: cfg.max_records]
    originals = [Node(f"root_{k:06d}", r.instruction, r.input, r.output, 0) for k, r in enumerate(records)]
    out = Path(cfg.out)
    lineages, survivors, tally, _ = restore(out, originals)  # type: ignore[arg-type]  # only `/` is used
    if (shard := Shard.parse(cfg.shard)) is not None:
        lineages = [lin for lin in lineages if shard.owns(lin.root.id)]
    attempts = sum(max(0, cfg.rounds - lin.next_round + 1) for lin in lineages)
    steps = [
        "evolve",
        *(["judge"] if cfg.judge_equal == "teacher" else []),
        *(["answer"] if cfg.answer else []),
    ]
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        summary = {}
    follow, source = 1.0, "every step of every attempt"
    if summary.get("candidates") and summary.get("requests") and len(steps) > 1:
        per_attempt = summary["requests"] / summary["candidates"]
        follow = min(1.0, max(0.0, (per_attempt - 1) / (len(steps) - 1)))
        source = f"{per_attempt:.2f} requests per decided attempt (observed)"
    counter = TokenCounter(cfg.teacher.model, cfg.teacher.in_process)
    decoding = evolve_decoding(cfg)
    chat = cfg.teacher.api == "chat"
    picked = random.Random(f"{cfg.seed}:plan").sample(lineages, min(sample, len(lineages)))
    plans: list[StagePlan] = []
    with (
        tempfile.TemporaryDirectory(prefix="selfinstruct-plan-") as scratch,
        _scratch_context(cfg, Path(scratch), [], decoding, ["evolve"], DurableJournal) as ctx,
    ):
        evolver = Evolver(ctx, [], originals, survivors, tally)
        for step in steps:
            prompts, answers = [], []
            for lin in picked:
                parent, round_ = lin.parent, min(lin.next_round, cfg.rounds)
                op = draw_op(cfg.seed, lin.root.id, round_, evolver.ops)
                request = evolver._request(Attempt(lin, round_, op, step, parent.instruction, parent.input))
                prompts.append(counter.request(request.messages, request.prompt))
                if step == "evolve":
                    shape = {"instruction": parent.instruction, "input": parent.input}
                    answers.append(
                        json.dumps(shape) if chat else format_task(parent.instruction, parent.input)
                    )
                elif step == "judge":
                    answers.append(json.dumps({"equal": False}) if chat else " No")
                else:
                    answers.append(parent.output)
            max_tokens = decoding[step]["max_tokens"]
            expected_c = min(max_tokens, sum(map(counter.count, answers)) / max(1, len(answers)))
            prompt_mean = sum(prompts) / max(1, len(prompts))
            n = attempts if step == "evolve" else round(attempts * follow)
            requests = (attempts if step == "evolve" else 0, n, attempts)
            seconds = _seconds(cfg.teacher, n, prompt_mean + expected_c, expected_c, {}, latency)
            note = f"{attempts} attempts to decide; {source}"
            # a batch holds the attempts at one step: each round's steps follow one another
            rounds_left = max((cfg.rounds - lin.next_round + 1 for lin in lineages), default=0)
            plans.append(
                StagePlan(
                    step,
                    requests,
                    prompt_mean,
                    (expected_c / 2, expected_c, float(max_tokens)),
                    "expected answer shape",
                    seconds,
                    note,
                    max(0, rounds_left),
                )
            )
    return _assemble("evolve", cfg, counter, plans, bool(summary))


PLANNERS: dict[str, Callable[..., dict[str, Any]]] = {"generate": plan_generate, "evolve": plan_evolve}


def print_plan(plan: dict[str, Any], console: Console) -> None:
    title = f"plan: {plan['command']} with {plan['model']}" + (
        " (Batch API prices)" if plan["batch_api"] else ""
    )
    table = Table(title=Text(title), title_justify="left")  # the model name is user text, not markup
    for col in ("stage", "requests", "prompt tok", "completion tok", "cost low / expected / high", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in plan["stages"]:
        c = r["cost"]
        table.add_row(
            r["stage"],
            f"{r['requests']['expected']:,}",
            f"{r['prompt_tokens']:,}",
            f"{r['completion_tokens']:,}",
            f"${c['low']:.4f} / ${c['expected']:.4f} / ${c['high']:.4f}",
            _time(r),
        )
    t = plan["total"]
    table.add_row(
        "total",
        f"{t['requests']:,}",
        "",
        f"{t['tokens']['expected']:,} (all)",
        f"${t['cost']['low']:.4f} / ${t['cost']['expected']:.4f} / ${t['cost']['high']:.4f}",
        _time(t),
    )
    console.print(table)
    console.print(f"tokens counted with {plan['tokenizer']}", markup=False, highlight=False)
    for r in plan["stages"]:
        console.print(
            f"  {r['stage']}: {r['note']}; completion tokens from {r['completion_source']}",
            markup=False,
            highlight=False,
        )
    if plan["batch_api"]:
        steps = t["batch_steps"]
        console.print(
            f"  Batch API: up to {plan['batch_window_h']} h per batch step (the provider's completion window); "
            f"{steps} sequential batch step{'s' if steps != 1 else ''}, so up to {_duration(t['max_seconds'])}",
            markup=False,
            highlight=False,
        )


def _time(row: dict[str, Any]) -> str:
    """A row's time: the estimate, or with `--batch-api` the batches it waits for one after another."""
    if row["seconds"] is not None:
        return _duration(row["seconds"])
    steps = row["batch_steps"]
    return f"{steps} batch step{'s' if steps != 1 else ''}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_main(argv: Sequence[str]) -> int:
    """`plan`'s own flags, then the planned command's whole command line."""
    import argparse

    from selfinstruct.cli import COMMANDS, parse_command

    split = next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))
    parser = argparse.ArgumentParser(
        prog="selfinstruct plan",
        description="Estimate requests, tokens, cost and time per stage of a command before running it: "
        f"selfinstruct plan [options] {{{','.join(PLANNERS)}}} FLAGS…",
    )
    add_arguments(parser, PlanConfig)
    own = resolve("plan", PlanConfig, vars(parser.parse_args(argv[:split])))
    if split == len(argv):
        raise UserError(f"plan: name the command to plan ({', '.join(PLANNERS)}) and its flags")
    name, cfg, _ = parse_command(argv[split:])
    if name is None or cfg is None:
        return 2
    if name not in PLANNERS:
        raise UserError(f"plan: cannot plan '{name}' (plannable: {', '.join(PLANNERS)})")
    run_plan(own, name, cfg)
    return 0


def run_plan(own: PlanConfig, name: str = "generate", cfg: Any = None) -> dict[str, Any]:
    plan = PLANNERS[name](cfg, own.sample, own.latency)
    if own.as_json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan, Console(highlight=False, width=max(120, shutil.get_terminal_size().columns)))
    return plan
