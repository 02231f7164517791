"""`selfinstruct merge RUN_0 … RUN_N-1 --out RUN`: join the run directories of `--shard i/N` jobs into one run.

Two ways to shard a generate run, one merge for both:
- per-record stages (classify, instances): every job starts from a copy of the same run directory and answers
  the instructions whose id hashes to its shard; the merge takes each record once (by id, the first shard that
  has it wins) and rebuilds the files in the instruction order, so it equals a single-process run;
- the bootstrap loop (sequential through its growing pool): every job grows its own pool from its share of the
  seed tasks (`--shard` on the bootstrap/alpaca stage), and the merge runs the exact ROUGE-L novelty filter
  across the shards (shard order, then file order), with the run's own filter settings. Within one shard every
  pair was already compared (ROUGE-L F is symmetric), so only cross-shard pairs can fail here; a dropped
  instruction goes to `rejected.jsonl` (stage `merge`) and its classification, instances and corpus records
  are left out.
Shards of `selfinstruct evolve --shard i/N` (lineages split by root id; every input record stays in each
shard's novelty pool) merge the same way: survivors once, each checked against the survivors of earlier shards
(lineages never straddle shards, so these are always other lineages), the corpus rebuilt as evolve writes it.
A dropped survivor's later rounds stay (they passed their own checks).
Shards of `selfinstruct select --shard i/N` (directories with scores.jsonl) merge into one score cache: every
(scorer, scoring model, record) line once, teacher usage summed; `selfinstruct select` on the merged directory
then selects from all the scores without asking the teacher again.
Usage is summed: the usage a job inherited from a copied base run (recorded when it first ran with `--shard`) is
counted once. Counts of records come from the merged files; requests, tokens, cost and time are sums.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import tomllib
from pydantic import Field

from selfinstruct.config import Section
from selfinstruct.errors import UserError
from selfinstruct.filters import TOO_SIMILAR, FilterConfig, novelty_index
from selfinstruct.pipeline.registry import PIPELINES
from selfinstruct.rundir import CLASSIFICATION, CORPUS, INSTANCES, INSTRUCTIONS, REJECTED
from selfinstruct.store import RunDir, atomic_write_json, atomic_write_text, read_jsonl

STATE, SUMMARY, CONFIG = "state.json", "summary.json", "config.toml"
SCORES, SELECT_STATE = "scores.jsonl", "select_state.json"  # of `selfinstruct select`
EVOLVED = "evolved.jsonl"  # of `selfinstruct evolve`
USAGE_KEYS = ("requests", "failed_requests", "retries", "prompt_tokens", "completion_tokens", "cost")
SESSION_COUNTERS = ("requests", "failed_requests", "prompt_tokens", "completion_tokens", "elapsed_s", "cpu_s")


class MergeConfig(Section):
    runs: list[str] = Field(
        ..., description="the shard run directories, in shard order", json_schema_extra={"positional": True}
    )
    out: str = Field(..., description="the merged run directory (must be new or empty)")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a generate run directory (no {path.name})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def _records(run: Path, name: str) -> list[dict[str, Any]]:
    return list(read_jsonl(run / name)) if (run / name).exists() else []


def _filters(run: Path) -> FilterConfig:
    """The novelty settings the shard ran with (its saved config), so the merge judges as the run did."""
    try:
        data = tomllib.loads((run / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return FilterConfig()
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{run / CONFIG}: unreadable ({e})") from None
    return FilterConfig.model_validate(data.get("filters", {}))


def merge_runs(runs: list[Path], out: Path) -> dict[str, Any]:
    """Merge shard run directories into `out`; returns the merged summary."""
    if len(runs) < 2:
        raise UserError("merge needs at least two run directories")
    if all((r / SCORES).exists() and not (r / STATE).exists() for r in runs):
        return _merge_scores(runs, out)
    states = [_load_json(run / STATE) for run in runs]
    identity = states[0].get("identity", {})
    for run, state in zip(runs[1:], states[1:], strict=True):
        other = state.get("identity", {})
        if (other.get("pipeline"), other.get("seeds_sha256")) != (
            identity.get("pipeline"),
            identity.get("seeds_sha256"),
        ):
            raise UserError(f"{run} is not a shard of the same run as {runs[0]} (other pipeline or seeds)")
    if identity.get("command") == "evolve":
        return _merge_evolve(runs, out, states)
    pipeline = identity.get("pipeline", "self-instruct")

    # instructions: each id once, then the exact novelty filter across shards
    index = novelty_index(_filters(runs[0]))
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    duplicates = 0
    for run in runs:
        fresh = []
        for rec in _records(run, INSTRUCTIONS):
            if rec["id"] in seen_ids:
                duplicates += 1
                continue
            seen_ids.add(rec["id"])
            fresh.append(rec)
        for rec, verdict in zip(fresh, index.query([r["instruction"] for r in fresh]), strict=True):
            if verdict.keep:
                kept.append(rec)
                continue
            nearest = verdict.nearest[0] if verdict.nearest else None
            rejected.append(
                {
                    "instruction": rec["instruction"],
                    "reason": TOO_SIMILAR,
                    "stage": "merge",
                    "nearest": {"instruction": nearest[0], "score": nearest[1]} if nearest else None,
                    "round": rec.get("round", 0),
                    "meta": {"id": rec["id"], "shard_dir": str(run)},
                }
            )
    order = {rec["id"]: n for n, rec in enumerate(kept)}

    def keyed(name: str) -> list[dict[str, Any]]:
        """A per-instruction file: each kept id's first record over the shards, in instruction order."""
        found: dict[str, dict[str, Any]] = {}
        for run in runs:
            for rec in _records(run, name):
                if rec["id"] in order:
                    found.setdefault(rec["id"], rec)
        return sorted(found.values(), key=lambda r: order[r["id"]])

    classification, instances = keyed(CLASSIFICATION), keyed(INSTANCES)
    corpus = _corpus(runs, order)
    # rejections of the shards (a copied base run's appear in every copy: once), then the merge's own
    shard_rejected: dict[str, dict[str, Any]] = {}
    for run in runs:
        for rec in _records(run, REJECTED):
            shard_rejected.setdefault(json.dumps(rec, sort_keys=True), rec)
    all_rejected = [*shard_rejected.values(), *rejected]

    with RunDir(out) as merged:
        _new_dir(merged)
        for name, records in (
            (INSTRUCTIONS, kept),
            (CLASSIFICATION, classification),
            (INSTANCES, instances),
            (REJECTED, all_rejected),
            (CORPUS, corpus),
        ):
            if records or (runs[0] / name).exists():
                atomic_write_text(merged / name, "".join(_line(r) for r in records))
        usage = _usage(states)
        state = {
            "identity": identity,
            "usage": usage,
            "elapsed_s": round(sum(s.get("elapsed_s", 0.0) for s in states), 3),
            "sessions": sum(s.get("sessions", 0) for s in states),
            "merged_from": [str(r) for r in runs],
        }
        summary = _summary(runs, pipeline, usage, kept, classification, instances, all_rejected, corpus)
        summary["merge"] = {
            "shards": len(runs),
            "duplicate_ids": duplicates,
            "dropped_too_similar": len(rejected),
        }
        atomic_write_json(merged / STATE, state)
        atomic_write_json(merged / SUMMARY, summary)
        if (runs[0] / CONFIG).exists():
            text = (runs[0] / CONFIG).read_text(encoding="utf-8")
            atomic_write_text(
                merged / CONFIG, "".join(ln for ln in text.splitlines(True) if not ln.startswith("shard ="))
            )
    return summary


def _new_dir(merged: RunDir) -> None:
    foreign = sorted(p.name for p in merged.path.iterdir() if p.name != ".lock")
    if foreign:
        raise UserError(f"{merged.path} is not empty ({foreign[0]}, …); merge into a new --out")


def _merge_scores(runs: list[Path], out: Path) -> dict[str, Any]:
    """Select shards: one score line per (scorer, by, id), the first good one; usage summed."""
    lines: dict[tuple[str, str, str], dict[str, Any]] = {}
    usage = dict.fromkeys(USAGE_KEYS, 0)
    for run in runs:
        for line in read_jsonl(run / SCORES):
            if line.get("score") is not None:
                lines.setdefault((line["scorer"], line["by"], line["id"]), line)
        if (run / SELECT_STATE).exists():
            used = _load_json(run / SELECT_STATE).get("usage", {})
            for key in USAGE_KEYS:
                usage[key] += used.get(key, 0)
    with RunDir(out) as merged:
        _new_dir(merged)
        atomic_write_text(merged / SCORES, "".join(_line(r) for r in lines.values()))
        atomic_write_json(merged / SELECT_STATE, {"usage": usage})
    return {"merge": {"shards": len(runs), "score_lines": len(lines)}, **usage}


def _merge_evolve(runs: list[Path], out: Path, states: list[dict[str, Any]]) -> dict[str, Any]:
    index = novelty_index(_filters(runs[0]))
    survivors: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    seen: set[str] = set()
    for run in runs:
        fresh = [r for r in _records(run, EVOLVED) if r["id"] not in seen]
        seen.update(r["id"] for r in fresh)
        verdicts = index.query([r["instruction"] for r in fresh], add_kept=False)  # vs earlier shards only
        kept_here = [r for r, v in zip(fresh, verdicts, strict=True) if v.keep]
        for rec, verdict in zip(fresh, verdicts, strict=True):
            if not verdict.keep:
                nearest = verdict.nearest[0] if verdict.nearest else None
                dropped.append(
                    {
                        **{k: rec.get(k) for k in ("instruction", "input", "output")},
                        "reason": TOO_SIMILAR,
                        "stage": "merge",
                        "nearest": {"instruction": nearest[0], "score": nearest[1]} if nearest else None,
                        "meta": {**(rec.get("meta") or {}), "id": rec["id"], "shard_dir": str(run)},
                    }
                )
        index.add(r["instruction"] for r in kept_here)
        survivors += kept_here
    shard_rejected: dict[str, dict[str, Any]] = {}
    for run in runs:
        for rec in _records(run, REJECTED):
            shard_rejected.setdefault(json.dumps(rec, sort_keys=True), rec)
    # evolve's corpus: the input records (every shard wrote them, when included), then the survivors
    originals = [r for r in _records(runs[0], CORPUS) if "evol" not in (r.get("meta") or {})]
    corpus = originals + [{k: r[k] for k in ("instruction", "input", "output", "meta")} for r in survivors]
    usage = _usage(states)
    with RunDir(out) as merged:
        _new_dir(merged)
        atomic_write_text(merged / EVOLVED, "".join(_line(r) for r in survivors))
        atomic_write_text(merged / REJECTED, "".join(_line(r) for r in [*shard_rejected.values(), *dropped]))
        atomic_write_text(merged / CORPUS, "".join(_line(r) for r in corpus))
        state = {"identity": states[0]["identity"], "usage": usage, "merged_from": [str(r) for r in runs]}
        summary = {
            "command": "evolve",
            "kept": len(survivors),
            "corpus_records": len(corpus),
            **usage,
            "merge": {"shards": len(runs), "dropped_too_similar": len(dropped), "duplicate_ids": 0},
        }
        atomic_write_json(merged / STATE, state)
        atomic_write_json(merged / SUMMARY, summary)
    return summary


def _line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def _corpus(runs: list[Path], order: dict[str, int]) -> list[dict[str, Any]]:
    """Each kept task's corpus records from the first shard that has them, in instruction order; seed
    records (`--include-seeds`, written by every shard) once, last, as the finetune stage writes them."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    seeds: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        here: dict[str, list[dict[str, Any]]] = {}
        for rec in _records(run, CORPUS):
            here.setdefault((rec.get("meta") or {}).get("task_id", ""), []).append(rec)
        for task_id, records in here.items():
            origin = (records[0].get("meta") or {}).get("origin")
            if origin == "seed":
                seeds.setdefault(task_id, records)
            elif task_id in order:
                tasks.setdefault(task_id, records)
    ordered = [r for task_id in sorted(tasks, key=order.__getitem__) for r in tasks[task_id]]
    return ordered + [r for records in seeds.values() for r in records]


def _usage(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Summed usage; what the shards inherited from a copied base run counts once."""
    total = dict.fromkeys(USAGE_KEYS, 0)
    bases: dict[str, dict[str, Any]] = {}
    for state in states:
        usage, base = state.get("usage", {}), state.get("usage_before_shard", {})
        bases.setdefault(json.dumps(base, sort_keys=True), base)
        for key in USAGE_KEYS:
            total[key] += usage.get(key, 0) - base.get(key, 0)
    for base in bases.values():
        for key in USAGE_KEYS:
            total[key] += base.get(key, 0)
    total["cost"] = round(total["cost"], 6)
    return total


def _summary(
    runs: list[Path],
    pipeline: str,
    usage: dict[str, Any],
    kept: list[dict[str, Any]],
    classification: list[dict[str, Any]],
    instances: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    corpus: list[dict[str, Any]],
) -> dict[str, Any]:
    """Record counts from the merged files; session counters (requests, tokens, time) summed over shards."""
    shard_summaries = [json.loads((r / SUMMARY).read_text()) for r in runs if (r / SUMMARY).exists()]
    by_stage: dict[str, Counter[str]] = {stage: Counter() for stage in PIPELINES[pipeline]}
    for rec in rejected:
        by_stage.setdefault(rec.get("stage", "?"), Counter())[rec.get("reason", "?")] += 1
    done = {
        PIPELINES[pipeline][0]: len(kept),
        "classify": len(classification),
        "instances": len(instances),
        "finetune": len({(r.get("meta") or {}).get("task_id") for r in corpus}),
    }
    stages: dict[str, Any] = {}
    for stage in PIPELINES[pipeline]:
        counters = {
            key: round(sum(s.get("stages", {}).get(stage, {}).get(key, 0) for s in shard_summaries), 3)
            for key in SESSION_COUNTERS
        }
        stages[stage] = {
            "total": len(kept),
            "done": done.get(stage, 0),
            "rejected_by_reason": dict(by_stage.get(stage, Counter()).most_common()),
            **counters,
            "finished": all(
                s.get("stages", {}).get(stage, {}).get("finished", False) for s in shard_summaries
            ),
        }
    all_rejected: Counter[str] = Counter(rec.get("reason", "?") for rec in rejected)
    return {
        "pipeline": pipeline,
        "teacher_model": shard_summaries[0].get("teacher_model") if shard_summaries else None,
        "kept": len(kept),
        "rejected_by_reason": dict(all_rejected.most_common()),
        **usage,
        "elapsed_s": round(sum(s.get("elapsed_s", 0.0) for s in shard_summaries), 3),
        "corpus_records": len(corpus),
        "stages": stages,
        "finished": all(s.get("finished", False) for s in shard_summaries),
    }


def run_merge(cfg: MergeConfig) -> int:
    from rich.console import Console

    summary = merge_runs([Path(r) for r in cfg.runs], Path(cfg.out))
    m = summary["merge"]
    if "score_lines" in m:
        Console(stderr=True, highlight=False).print(
            f"merged {m['shards']} select shards into {cfg.out}: {m['score_lines']} scores, "
            f"{summary['requests']} requests; now run `selfinstruct select … --out {cfg.out}` to select",
            markup=False,
        )
        return 0
    Console(stderr=True, highlight=False).print(
        f"merged {m['shards']} shards into {cfg.out}: {summary['kept']} "
        f"{'survivors' if summary.get('command') == 'evolve' else 'instructions'} "
        f"({m['dropped_too_similar']} dropped as too similar across shards, {m['duplicate_ids']} repeated ids), "
        f"{summary['corpus_records']} corpus records, {summary['requests']} requests, ${summary['cost']:.4f}",
        markup=False,
    )
    return 0
