"""Seed tasks: the project's own labelled seed set. Reading seed files (and every other corpus shape) lives in
`selfinstruct.corpus`, one reader for every command."""

from __future__ import annotations

from pathlib import Path

PROJECT_SEEDS = Path(__file__).parent / "data" / "seed_tasks.jsonl"
"""The project's own labelled seed set: `seeds/seed_tasks.jsonl` of the repository, shipped as package data
(`selfinstruct/data/seed_tasks.jsonl` links to it in a source checkout and is a copy in a built wheel)."""
