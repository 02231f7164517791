"""`selfinstruct split`: hold out tasks for evaluation.

Self-Instruct measures success as following instructions the model never saw, including whole task types it
never saw. `split` therefore holds out whole categories ("unseen") plus a fraction of the remaining tasks
("seen" types, new tasks), never splitting the instances of one task. A conversation (`messages`) is held out
whole, as one instance of its task (`task_of`), and written back with its `messages` intact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from selfinstruct.config import Section
from selfinstruct.errors import UserError
from selfinstruct.evaluate import category_of, load_records, task_of
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_write_json, atomic_write_text, existing_outputs


def _write_jsonl(path: Path, records: Iterable[CorpusRecord]) -> None:
    atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))


class SplitConfig(Section):
    """The `[split]` table and the `selfinstruct split` flags."""

    corpus: str | None = Field(
        None,
        description="corpus to split: Alpaca JSON/JSONL (meta.category, meta.task_id), chat JSONL "
        "(conversations are held out whole) or a run directory",
        json_schema_extra={"positional": True},
    )
    out: str | None = Field(None, description="directory for train.jsonl, heldout.jsonl and split.json")
    holdout_categories: list[str] = Field([], description="categories held out whole: the unseen task types")
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of the other tasks held out too (seen task types, new tasks)"
    )
    seed: int = Field(0, description="seed for choosing the held-out tasks")
    force: bool = Field(False, description="overwrite an existing train.jsonl / heldout.jsonl")


@dataclass
class SplitResult:
    train: list[CorpusRecord]
    heldout: list[CorpusRecord]
    unseen_categories: list[str]
    heldout_tasks: int
    train_tasks: int


def split_records(
    records: list[CorpusRecord], holdout_categories: Iterable[str], fraction: float, seed: int
) -> SplitResult:
    """Hold out whole categories, then `fraction` of the remaining tasks; file order is kept on both sides.

    Deterministic: tasks are drawn from a sorted list with `random.Random(seed)`, so the same corpus and seed
    give the same split whatever order the records come in. A task with any record in a held-out category is
    held out whole.
    """
    unseen = sorted(set(holdout_categories))
    known = {category_of(r) for r in records}
    missing = [c for c in unseen if c not in known]
    if missing:
        raise UserError(
            f"--holdout-categories: {', '.join(missing)} not in the corpus (categories: {', '.join(sorted(known))})"
        )
    unseen_tasks = {task_of(r) for r in records if category_of(r) in unseen}
    other_tasks = sorted({task_of(r) for r in records} - unseen_tasks)
    rng = random.Random(seed)
    drawn = set(rng.sample(other_tasks, round(len(other_tasks) * fraction)))
    held = unseen_tasks | drawn
    return SplitResult(
        train=[r for r in records if task_of(r) not in held],
        heldout=[r for r in records if task_of(r) in held],
        unseen_categories=unseen,
        heldout_tasks=len(held),
        train_tasks=len(other_tasks) - len(drawn),
    )


def split(cfg: SplitConfig) -> SplitResult:
    if not cfg.corpus:
        raise UserError("split needs a CORPUS (a corpus file or a run directory)")
    if not cfg.out:
        raise UserError("split needs --out DIR")
    out = Path(cfg.out)
    existing_outputs([out / "train.jsonl", out / "heldout.jsonl"], cfg.force)
    result = split_records(load_records(cfg.corpus), cfg.holdout_categories, cfg.holdout_fraction, cfg.seed)
    if not result.heldout:
        raise UserError("nothing held out: give --holdout-categories or a larger --holdout-fraction")
    if not result.train:
        raise UserError("nothing left to train on: hold out fewer categories or a smaller fraction")
    _write_jsonl(out / "train.jsonl", result.train)
    _write_jsonl(out / "heldout.jsonl", result.heldout)
    atomic_write_json(
        out / "split.json",
        {
            "corpus": cfg.corpus,
            "seed": cfg.seed,
            "holdout_fraction": cfg.holdout_fraction,
            "unseen_categories": result.unseen_categories,
            "train": {"records": len(result.train), "tasks": result.train_tasks},
            "heldout": {"records": len(result.heldout), "tasks": result.heldout_tasks},
        },
    )
    return result


def run_split(cfg: SplitConfig) -> int:
    r = split(cfg)
    unseen = ", ".join(r.unseen_categories) or "none"
    print(
        f"train: {len(r.train)} records ({r.train_tasks} tasks) · held out: {len(r.heldout)} records "
        f"({r.heldout_tasks} tasks; unseen categories: {unseen})"
    )
    print(f"wrote {Path(str(cfg.out)) / 'train.jsonl'} and {Path(str(cfg.out)) / 'heldout.jsonl'}")
    return 0
