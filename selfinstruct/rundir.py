"""The run directory's contract: its file names and the shape of every record in them.

Every writer (the pipeline stages, `generate`'s monitor) and every reader (export, report, train, demo) names
the files through these constants and builds or reads records by these types, so a renamed file or a new field
is one edit here. The record types are `TypedDict`s: a record is built as a plain dict (cheap on the hot path
that keeps thousands of candidates a second) and still checked by a type checker.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from selfinstruct.records import CorpusRecord

INSTRUCTIONS = "instructions.jsonl"
"""Kept instructions with provenance (bootstrap / alpaca), one JSON object a line."""
REJECTED = "rejected.jsonl"
"""Rejected candidates and unreadable answers, with the reason and the stage."""
CLASSIFICATION = "classification.jsonl"
"""The classify stage's answer per instruction id."""
INSTANCES = "instances.jsonl"
"""The instances stage's input/output examples per instruction id."""
CORPUS = "corpus.jsonl"
"""The training corpus: Alpaca fields + `meta`, rebuilt by the corpus stage."""
SUMMARY = "summary.json"
"""Counts, cost and stage progress; rewritten atomically while the run goes on."""
STATE = "state.json"
"""What a resumed run needs: the run's identity (pipeline, seeds hash), usage so far, sessions."""
CONFIG = "config.toml"
"""The resolved settings of the last session (secrets redacted), readable back with `--config`."""

JOURNALED = (INSTRUCTIONS, REJECTED, CLASSIFICATION, INSTANCES)
"""The append-only files, written through the group-commit journal."""


# ---------------------------------------------------------------- record shapes (one JSON object a line)


class Nearest(TypedDict):
    instruction: str
    score: float


class KeptRecord(TypedDict):
    """A line of `instructions.jsonl` (the fields of `records.InstructionRecord`)."""

    id: str  # gen_000000, …
    instruction: str
    round: int
    origin: str  # "machine"
    is_classification: bool | None
    instances: list[dict[str, str]]  # Alpaca pipeline: the task's one {"input", "output"}; else []
    most_similar: dict[str, float]  # nearest pool instructions -> ROUGE-L F
    avg_similarity: float | None
    meta: dict[str, Any]  # provenance: teacher_model, pipeline, prompt_hash, seed_ids, machine_ids


class RejectedRecord(TypedDict):
    """A line of `rejected.jsonl`: a candidate or an answer that yielded nothing usable."""

    instruction: str  # the candidate, or the raw text (cut to 2000 characters) of an unreadable answer
    reason: str  # a filter's reason (too_similar, too_short, blacklisted:draw, …), unparseable, truncated
    stage: str
    nearest: Nearest | None  # too_similar: the pool instruction it is too close to
    round: int
    meta: dict[str, Any]


class ClassificationRecord(TypedDict):
    """A line of `classification.jsonl`; `is_classification` is None for an unreadable answer; `score` (logprob
    scoring only) is the calibrated log P(yes) − log P(no)."""

    id: str
    is_classification: bool | None
    score: NotRequired[float]


class InstancesRecord(TypedDict):
    """A line of `instances.jsonl`: [] when the answer was unreadable."""

    id: str
    output_first: bool
    instances: list[dict[str, str]]


class Summary(TypedDict):
    """`summary.json` of a generate run (`stages` holds each stage's `StageStats.to_dict()`)."""

    pipeline: str
    teacher_model: str
    target: int
    kept: int
    rejected_by_reason: dict[str, int]
    parse_failures: int
    candidates: int
    requests: int
    failed_requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    elapsed_s: float
    corpus_records: int
    stages: dict[str, dict[str, Any]]
    finished: bool
    stop_reason: str | None
    sessions: int


CorpusLine = CorpusRecord
"""A line of `corpus.jsonl` (`CorpusRecord.to_dict()`: instruction, input, output, meta)."""

RUN_FILES: dict[str, str] = {
    INSTRUCTIONS: "kept instructions with provenance",
    REJECTED: "rejected candidates with reason and stage",
    CLASSIFICATION: "classify stage results by instruction id",
    INSTANCES: "instances stage results by instruction id",
    CORPUS: "the training corpus",
    SUMMARY: "counts, cost, per-stage progress",
    CONFIG: "resolved settings, no secrets",
}
"""Every file a user reads in a generate run directory (state.json is internal); the README's outputs table
names each of them (checked by a test)."""


# ---------------------------------------------------------------- curation commands (filter, dedup)

KEPT = "kept.jsonl"
"""`filter`/`dedup`: the records kept, unchanged apart from similarity metadata under `meta`."""


class CurationRejection(TypedDict, total=False):
    """A line of `filter`'s or `dedup`'s `rejected.jsonl`. It shares `instruction`, `reason` and `stage` with a
    generate run's `RejectedRecord`, so one reader counts rejections of any run directory."""

    instruction: str
    reason: str
    stage: str  # "filter" or "dedup"
    line: int  # the rejected record's line in the input
    nearest: str | None
    similarity: float | None
    record: dict[str, Any]  # the input record, unchanged
