"""The last stage of both pipelines (named `finetune` on the command line, as in the reference's "prepare for
finetuning"): clean the instances and write `corpus.jsonl` (Alpaca fields + `meta`). It trains nothing.

Instances come from `instances.jsonl` when the pipeline has a stage writing it (Self-Instruct), else from the
kept record itself (Alpaca: each task carries its one instance).

The reference's finetune-preparation rules, in its order: an instance is dropped when its output is empty, its
input equals its output, or its input or output ends with ":" (usually a cut-off generation); then a task whose
remaining instances share a non-empty input but disagree on the output is dropped whole; duplicates are
removed; at most `max_instances` per task. The Alpaca pipeline's tasks (one instance each) pass the same rules:
a deviation, since the reference Alpaca applies none, that `--no-instance-rules` undoes. One rule of ours comes
on top (`--no-drop-repetitive` turns it off): an instance whose input or output loops on itself (`repetitive`),
what a small teacher decoding greedily often writes; it counts as invalid. The corpus is rebuilt from the run's
files every time (it is cheap and makes the stage trivially resumable) and replaced atomically, so a reader
never sees half a corpus.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from selfinstruct.filters.heuristics import Repetitive
from selfinstruct.pipeline.stage import RunContext, Stage, owned_records, read_keyed
from selfinstruct.records import CorpusRecord, Instance
from selfinstruct.rundir import CLASSIFICATION, CORPUS, INSTANCES, INSTRUCTIONS
from selfinstruct.store import atomic_write_text


def _invalid(inp: str, out: str) -> str | None:
    """The reference's reason to drop one instance, or None."""
    if not out:
        return "empty_output"
    if inp == out:
        return "input_equals_output"
    if inp.endswith(":") or out.endswith(":"):
        return "ends_with_colon"
    return None


def clean_instances(
    instances: list[Instance],
    limit: int,
    dropped: Counter[str],
    repetitive: Repetitive | None = None,
    rules: bool = True,
) -> list[Instance]:
    """The reference's rules, in its order: drop invalid instances first (with `repetitive`, when given, among
    the invalid), then drop the whole task if two of the rest share an input but disagree on the output, then
    dedupe. `rules=False` skips the reference's two rules (not `repetitive`, deduplication or the limit).
    Returns [] when the whole task must go; reasons are counted in `dropped`."""
    valid: list[Instance] = []
    for inst in instances:
        inp, out = inst.input.strip(), inst.output.strip()
        reason = _invalid(inp, out) if rules else None
        if reason is None and repetitive is not None and (repetitive(inp) or repetitive(out)):
            reason = "repetitive"
        if reason:
            dropped[reason] += 1
        else:
            valid.append(Instance(inp, out))
    outputs_by_input: dict[str, set[str]] = {}
    for inst in valid:
        if inst.input:
            outputs_by_input.setdefault(inst.input, set()).add(inst.output)
    if rules and any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        dropped["conflicting_outputs"] += len(valid)
        return []
    kept: list[Instance] = []
    seen: set[tuple[str, str]] = set()
    for inst in valid:
        if (inst.input, inst.output) in seen:
            dropped["duplicate"] += 1
        elif len(kept) >= limit:
            dropped["over_limit"] += 1
        else:
            seen.add((inst.input, inst.output))
            kept.append(inst)
    return kept


NAME = "finetune"


async def run(ctx: RunContext) -> None:
    cfg, stats = ctx.cfg, ctx.stats[NAME]
    instructions = owned_records(ctx, read_keyed(ctx.run, INSTRUCTIONS))  # --shard: this job's share
    labels = read_keyed(ctx.run, CLASSIFICATION)
    from_instances = any(stage.output == INSTANCES for stage in ctx.pipeline)
    generated = read_keyed(ctx.run, INSTANCES) if from_instances else {}
    dropped: Counter[str] = Counter()
    repetitive = Repetitive() if cfg.drop_repetitive else None
    records: list[CorpusRecord] = []
    waiting = tasks_dropped = 0
    for rec_id, rec in instructions.items():
        if from_instances:
            if rec_id not in generated:
                waiting += 1  # instance generation has not reached it yet
                continue
            raw = generated[rec_id]["instances"]
        else:
            raw = rec["instances"]
        label = labels.get(rec_id, {}).get("is_classification", rec.get("is_classification"))
        instances = clean_instances(
            [Instance(i["input"], i["output"]) for i in raw],
            cfg.max_instances,
            dropped,
            repetitive,
            cfg.instance_rules,
        )
        if not instances:
            tasks_dropped += 1
        meta: dict[str, Any] = {
            "task_id": rec_id,
            "is_classification": label,
            "origin": "machine",
            "category": None,
        }
        records += [CorpusRecord(rec["instruction"], i.input, i.output, dict(meta)) for i in instances]
    if cfg.include_seeds:
        for seed in ctx.seeds:
            meta = {
                "task_id": seed.id,
                "is_classification": seed.is_classification,
                "origin": "seed",
                "category": seed.category,
            }
            records += [CorpusRecord(seed.instruction, i.input, i.output, dict(meta)) for i in seed.instances]
    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    atomic_write_text(ctx.run / CORPUS, text)
    stats.total = len(instructions)
    stats.done = len(instructions) - waiting - tasks_dropped
    stats.finished = waiting == 0
    stats.extra = {
        "corpus_records": len(records),
        "tasks_waiting_for_instances": waiting,
        "tasks_dropped": tasks_dropped,
        "instances_dropped": dict(dropped.most_common()),
    }


STAGE = Stage(name=NAME, run=run, output=CORPUS, record=CorpusRecord)
