"""`selfinstruct mix`: one training corpus from several, by weight, with a cap per task (FLAN-style mixtures).

FLAN caps every dataset (30k examples in 2021) so that big tasks do not drown small ones, and Flan 2022 weights
tasks by `min(cap, size)`. Here each source file gets a weight (`A.jsonl:0.4`); the records are grouped into
tasks (`meta.task`, else `meta.task_id`, else the whole source file), each task keeps a seeded sample of at most
`--cap-per-task` records, and then each source contributes its share of `--total`:

* weights and `--total N`: N records split by weight. A source with fewer records than its share gives all it
  has and the rest is spread over the others by weight (printed in the summary); more than the sources hold
  altogether is an error.
* weights, no `--total`: the largest mixture with exactly those proportions.
* no weights: every source weighs its (capped) size, i.e. examples-proportional mixing with a cap.

No record is repeated. The result is shuffled, each record gains `meta.source` (the file it came from), and the
same inputs and `--seed` give a byte-identical file.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from selfinstruct.config import Section
from selfinstruct.corpus import load_corpus_any
from selfinstruct.errors import UserError
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_write_text, existing_outputs
from selfinstruct.templatize import to_jsonl


class MixConfig(Section):
    """The `[mix]` table and the `selfinstruct mix` flags."""

    sources: list[str] = Field(
        [],
        description="corpora to mix, each FILE or FILE:WEIGHT (any corpus: Alpaca, seed, chat JSONL, Parquet)",
        json_schema_extra={"positional": True},
    )
    out: str | None = Field(None, description="output JSONL of the mixture")
    total: int | None = Field(None, gt=0, description="records in the mixture (default: see the weights)")
    cap_per_task: int | None = Field(None, gt=0, description="at most this many records of any one task")
    seed: int = Field(0, description="seed for the caps, the draws and the final shuffle")
    force: bool = Field(False, description="overwrite an existing --out file")


@dataclass
class Source:
    path: str
    weight: float | None
    records: list[CorpusRecord]


def parse_source(spec: str) -> tuple[str, float | None]:
    """`FILE:WEIGHT` or `FILE`; a path that itself contains ':' works as long as the last part is no number."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            w = float(weight)
        except ValueError:
            return spec, None
        if not w > 0:
            raise UserError(f"{spec}: the weight must be a positive number")
        return path, w
    return spec, None


def task_key(record: CorpusRecord, source: str) -> str:
    task = record.meta.get("task") or record.meta.get("task_id")
    return f"task:{task}" if task is not None else f"file:{source}"


def allocate(total: int, weights: list[float], available: list[int]) -> list[int]:
    """Split `total` by weight without giving any source more than it has (largest remainders, ties by order).

    Sources that cannot fill their share give everything; the shortfall goes to the others by weight.
    """
    alloc = [0] * len(weights)
    active = [i for i, w in enumerate(weights) if w > 0 and available[i] > 0]
    remaining = total
    while remaining > 0 and active:
        wsum = sum(weights[i] for i in active)
        share = {i: remaining * weights[i] / wsum for i in active}
        full = [i for i in active if available[i] - alloc[i] <= share[i]]
        if full:
            for i in full:
                remaining -= available[i] - alloc[i]
                alloc[i] = available[i]
            active = [i for i in active if i not in full]
            continue
        floors = {i: int(share[i]) for i in active}
        for i in active:
            alloc[i] += floors[i]
        left = remaining - sum(floors.values())
        for i in sorted(active, key=lambda i: (-(share[i] - floors[i]), i))[:left]:
            alloc[i] += 1
        remaining = 0
    return alloc


def mix_records(
    sources: list[Source], *, total: int | None, cap_per_task: int | None, seed: int
) -> tuple[list[CorpusRecord], list[dict[str, Any]]]:
    """The shuffled mixture and one summary row per source."""
    rng = random.Random(seed)
    by_task: dict[str, list[tuple[int, int]]] = defaultdict(list)  # task -> (source index, record index)
    for s, src in enumerate(sources):
        for r, rec in enumerate(src.records):
            by_task[task_key(rec, src.path)].append((s, r))
    pools: list[list[int]] = [[] for _ in sources]
    capped_tasks = 0
    for members in by_task.values():  # insertion order: the order tasks first appear in the sources
        if cap_per_task and len(members) > cap_per_task:
            members = sorted(rng.sample(members, cap_per_task))
            capped_tasks += 1
        for s, r in members:
            pools[s].append(r)
    available = [len(p) for p in pools]
    weighted = sources[0].weight is not None
    weights = [src.weight for src in sources] if weighted else [float(n) for n in available]
    if total is None:
        total = (
            int(min(n / (w / sum(weights)) for n, w in zip(available, weights, strict=True) if w))  # type: ignore[operator]
            if weighted
            else sum(available)
        )
    if total > sum(available):
        raise UserError(
            f"--total {total}: the sources hold only {sum(available)} records"
            + (" after --cap-per-task" if cap_per_task else "")
        )
    counts = allocate(total, weights, available)  # type: ignore[arg-type]
    mixture: list[CorpusRecord] = []
    rows = []
    for src, pool, n, w in zip(sources, pools, counts, weights, strict=True):
        for r in sorted(rng.sample(pool, n)):
            rec = src.records[r]
            mixture.append(replace(rec, meta={**rec.meta, "source": src.path}))  # conversations stay whole
        rows.append(
            {
                "source": src.path,
                "weight": w / sum(weights),
                "tasks": len({task_key(rec, src.path) for rec in src.records}),
                "records": len(src.records),
                "after_cap": len(pool),
                "taken": n,
            }
        )
    rng.shuffle(mixture)
    for row in rows:
        row["share"] = row["taken"] / len(mixture) if mixture else 0.0
    return mixture, rows


def load_sources(specs: list[str]) -> list[Source]:
    if not specs:
        raise UserError("mix needs at least one SOURCE (FILE or FILE:WEIGHT)")
    parsed = [parse_source(s) for s in specs]
    if len({w is None for _, w in parsed}) > 1:
        raise UserError("give a weight to every source (FILE:WEIGHT) or to none")
    seen: set[str] = set()
    for path, _ in parsed:
        if path in seen:
            raise UserError(f"{path}: given twice")
        seen.add(path)
    return [Source(path, w, load_corpus_any(path)) for path, w in parsed]


def mix(cfg: MixConfig) -> dict[str, Any]:
    if not cfg.out:
        raise UserError("mix needs --out FILE.jsonl")
    out = Path(cfg.out)
    existing_outputs([out], cfg.force)
    sources = load_sources(cfg.sources)
    mixture, rows = mix_records(sources, total=cfg.total, cap_per_task=cfg.cap_per_task, seed=cfg.seed)
    if not mixture:
        raise UserError("the mixture is empty")
    atomic_write_text(out, to_jsonl(mixture))
    return {"records": len(mixture), "sources": rows, "out": str(out)}


def run_mix(cfg: MixConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    summary = mix(cfg)
    table = Table("source", "weight", "tasks", "records", "after cap", "taken", "share")
    for r in summary["sources"]:
        table.add_row(
            r["source"],
            f"{r['weight']:.3f}",
            str(r["tasks"]),
            str(r["records"]),
            str(r["after_cap"]),
            str(r["taken"]),
            f"{r['share']:.3f}",
        )
    Console(highlight=False, markup=False).print(table)  # source paths are user text, not markup
    print(f"wrote {summary['records']} records to {summary['out']}")
    return 0
