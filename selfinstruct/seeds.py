"""Seed tasks: the project's own seed set. Reading seed and corpus files lives in `selfinstruct.corpus` (one
reader for every command); its loaders are re-exported here for callers that think of them as seed loaders."""

from __future__ import annotations

from pathlib import Path

from selfinstruct.corpus import (
    is_seed_format,
    load_alpaca,
    load_corpus_any,
    load_corpus_rows,
    load_seed_tasks,
    load_tasks_any,
    read_json_records,
    seed_corpus,
)

PROJECT_SEEDS = Path(__file__).parent / "data" / "seed_tasks.jsonl"
"""The project's own labelled seed set: `seeds/seed_tasks.jsonl` of the repository, shipped as package data
(`selfinstruct/data/seed_tasks.jsonl` links to it in a source checkout and is a copy in a built wheel)."""

__all__ = [
    "PROJECT_SEEDS",
    "is_seed_format",
    "load_alpaca",
    "load_corpus_any",
    "load_corpus_rows",
    "load_seed_tasks",
    "load_tasks_any",
    "read_json_records",
    "seed_corpus",
]
