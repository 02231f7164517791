"""Load seed tasks and corpora: the self-instruct seed JSONL and Alpaca JSON/JSONL.

Every problem is reported as `file:line: what is wrong` (an `InputFileError`, exit code 2), so a user with a
hand-written seed file can fix it without reading a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfinstruct.errors import InputFileError
from selfinstruct.records import CorpusRecord, Instance, SeedTask

PROJECT_SEEDS = Path(__file__).parent / "data" / "seed_tasks.jsonl"
"""The project's own labelled seed set: `seeds/seed_tasks.jsonl` of the repository, shipped as package data
(`selfinstruct/data/seed_tasks.jsonl` links to it in a source checkout and is a copy in a built wheel)."""


def read_json_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON array of objects or JSON lines; return `(line number, object)` pairs."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputFileError(p, None, "file not found") from None
    except IsADirectoryError:
        raise InputFileError(p, None, "is a directory, expected a JSON or JSONL file") from None
    except OSError as e:
        raise InputFileError(p, None, f"cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputFileError(p, line, f"not valid UTF-8 (byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputFileError(p, None, "file is empty")
    records = _read_array(p, text) if stripped.startswith("[") else _read_lines(p, text)
    if not records:
        raise InputFileError(p, None, "no records in file")
    return records


def _read_lines(p: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(p, n, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputFileError(p, n, f"expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def _read_array(p: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Decode a JSON array element by element so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    line_of = lambda i: text.count("\n", 0, i) + 1  # noqa: E731
    i = text.index("[") + 1
    out: list[tuple[int, dict[str, Any]]] = []
    expect_value = True
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i >= len(text):
            raise InputFileError(p, line_of(i), "invalid JSON: unterminated array")
        if text[i] == "]":
            if text[i + 1 :].strip():
                raise InputFileError(p, line_of(i + 1), "invalid JSON: extra data after the array")
            return out
        if not expect_value:
            if text[i] != ",":
                raise InputFileError(p, line_of(i), "invalid JSON: expected ',' or ']'")
            i += 1
            expect_value = True
            continue
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputFileError(p, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputFileError(p, line_of(i), f"expected a JSON object, got {type(obj).__name__}")
        out.append((line_of(i), obj))
        i, expect_value = end, False


# ---------------------------------------------------------------- schemas (strict: a number is not a string)


class _InstanceIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    input: str = ""
    output: str


class _SeedIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str = Field(min_length=1)
    name: str = ""
    instruction: str
    instances: list[_InstanceIn] = Field(min_length=1)
    is_classification: bool = False
    category: str | None = None


class _AlpacaIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    instruction: str
    input: str = ""
    output: str
    meta: dict[str, Any] = Field(default_factory=dict)


def _validate(schema: type[BaseModel], p: Path, line: int, obj: dict[str, Any]) -> Any:
    try:
        rec = schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "record"
        msg = "missing required field" if err["type"] == "missing" else err["msg"].lower()
        raise InputFileError(p, line, f"field '{field}': {msg}") from None
    if not rec.instruction.strip():
        raise InputFileError(p, line, "field 'instruction': is empty")
    return rec


def is_seed_format(obj: dict[str, Any]) -> bool:
    return "instances" in obj


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Self-instruct seed JSONL (`id, name, instruction, instances[{input, output}], is_classification`)."""
    p = Path(path)
    return _seed_tasks(p, read_json_records(p))


def _seed_tasks(p: Path, records: list[tuple[int, dict[str, Any]]]) -> list[SeedTask]:
    tasks: list[SeedTask] = []
    first_line: dict[str, int] = {}
    for line, obj in records:
        rec = _validate(_SeedIn, p, line, obj)
        if rec.id in first_line:
            raise InputFileError(p, line, f"duplicate id '{rec.id}' (first on line {first_line[rec.id]})")
        first_line[rec.id] = line
        tasks.append(
            SeedTask(
                id=rec.id,
                name=rec.name or rec.id,
                instruction=rec.instruction.strip(),
                instances=[Instance(i.input, i.output) for i in rec.instances],
                is_classification=rec.is_classification,
                category=rec.category,
            )
        )
    return tasks


def load_alpaca(path: str | Path) -> list[CorpusRecord]:
    """Alpaca JSON (array) or JSONL with `instruction`, optional `input`, `output` (and our optional `meta`)."""
    p = Path(path)
    return _alpaca(p, read_json_records(p))


def _alpaca(p: Path, records: list[tuple[int, dict[str, Any]]]) -> list[CorpusRecord]:
    out = []
    for line, obj in records:
        rec = _validate(_AlpacaIn, p, line, obj)
        out.append(CorpusRecord(rec.instruction, rec.input, rec.output, dict(rec.meta)))
    return out


def load_tasks_any(path: str | Path) -> list[SeedTask]:
    """Seed tasks from either format.

    Alpaca records sharing a `meta.task_id` (or, without one, the same instruction) become one task with
    several instances, so a corpus exported from seeds or a split turns back into the same tasks; `meta`'s
    category and `is_classification` carry over. Tasks without a task id get ids `<stem>_<n>`.
    """
    p = Path(path)
    records = read_json_records(p)
    if is_seed_format(records[0][1]):
        return _seed_tasks(p, records)
    tasks: dict[str, SeedTask] = {}
    for r in _alpaca(p, records):
        key = str(r.meta.get("task_id") or r.instruction.strip())
        task = tasks.get(key)
        if task is None:
            task_id = str(r.meta.get("task_id") or f"{p.stem}_{len(tasks)}")
            task = tasks[key] = SeedTask(
                id=task_id,
                name=task_id,
                instruction=r.instruction.strip(),
                instances=[],
                is_classification=bool(r.meta.get("is_classification")),
                category=r.meta.get("category"),
            )
        task.instances.append(Instance(r.input, r.output))
    return list(tasks.values())


def seed_corpus(tasks: list[SeedTask]) -> list[CorpusRecord]:
    """Seed tasks as corpus records, one per instance, keeping task id, category and label-ness under `meta`."""
    return [
        CorpusRecord(
            task.instruction,
            inst.input,
            inst.output,
            {
                "task_id": task.id,
                "is_classification": task.is_classification,
                "origin": "seed",
                "category": task.category,
            },
        )
        for task in tasks
        for inst in task.instances
    ]


def load_corpus_any(
    path: str | Path, records: list[tuple[int, dict[str, Any]]] | None = None
) -> list[CorpusRecord]:
    """Corpus records from Alpaca JSON/JSONL or from a seed JSONL (each seed instance becomes a record).

    `records` are the file's already-read `read_json_records`, for callers that looked at them first.
    """
    p = Path(path)
    records = records if records is not None else read_json_records(p)
    return seed_corpus(_seed_tasks(p, records)) if is_seed_format(records[0][1]) else _alpaca(p, records)
