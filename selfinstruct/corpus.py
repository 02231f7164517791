"""The one corpus reader: every command that reads records goes through here.

Accepted everywhere: a run directory (its `corpus.jsonl`), Alpaca JSON (array) or JSONL, the self-instruct seed
JSONL (each instance becomes a record), chat JSONL with any number of turns (TRL/Tulu `messages`, ShareGPT /
OpenHermes `conversations`, TRL prompt/completion message lists) and Parquet with those columns. Formats may
mix line by line. Every problem is reported as `file:line: what is wrong` (an `InputFileError`, exit code 2), so
a user with a hand-written file can fix it without reading a traceback.

A chat record becomes a `CorpusRecord` whose `messages` hold the whole conversation (system turn included) and
whose Alpaca fields hold its first exchange, so single-turn tools (dedup, select, novelty filters) still see
an instruction and an answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfinstruct.errors import InputFileError
from selfinstruct.records import CorpusRecord, Instance, SeedTask

CORPUS_FILE = "corpus.jsonl"
CHAT_KEYS = ("messages", "conversations", "prompt", "completion")
"""A line with one of these keys is a chat record."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
"""ShareGPT `from` values (and the role names some dumps use instead) as chat roles."""


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
    """Alpaca JSON (array) or JSONL with `instruction`, optional `input`, `output` (and our optional `meta`);
    chat lines are read too (see `chat_record`)."""
    p = Path(path)
    return _alpaca(p, read_json_records(p))


def _alpaca(p: Path, records: list[tuple[int, dict[str, Any]]]) -> list[CorpusRecord]:
    out = []
    for line, obj in records:
        if is_chat(obj):
            out.append(chat_record(p, line, obj))
            continue
        rec = _validate(_AlpacaIn, p, line, obj)
        out.append(CorpusRecord(rec.instruction, rec.input, rec.output, dict(rec.meta)))
    return out


# ---------------------------------------------------------------- chat records


def is_chat(obj: dict[str, Any]) -> bool:
    return any(k in obj for k in CHAT_KEYS)


def chat_messages(p: Path, line: int, obj: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a chat line as `{role, content}` messages, checked: an optional system turn first,
    then user and assistant turns alternating, starting with the user and ending with the assistant."""
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise InputFileError(p, line, "fields 'prompt' and 'completion' must both be lists of messages")
        raw, key = prompt + completion, "content"
    elif "conversations" in obj:  # ShareGPT / OpenHermes
        raw = obj["conversations"]
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise InputFileError(p, line, "field 'conversations' must be a list of {from, value} objects")
        raw = [
            {"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in raw
        ]
        key = "content"
    else:
        raw, key = obj.get("messages"), "content"
        if not isinstance(raw, list):
            raise InputFileError(p, line, "field 'messages' must be a list of {role, content} objects")
    messages = []
    for k, m in enumerate(raw, start=1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputFileError(
                p, line, f"message {k}: role must be system, user or assistant (got {m!r:.80})"
            )
        if not isinstance(m.get(key), str):
            raise InputFileError(p, line, f"message {k} ({m['role']}) needs a string content")
        messages.append({"role": m["role"], "content": m[key]})
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for k, m in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        article = "a" if expected == "user" else "an"
        if m["role"] != expected:
            raise InputFileError(
                p,
                line,
                f"message {k + 1 + len(messages) - len(turns)}: expected {article} {expected} turn, got "
                f"{m['role']} (turns must alternate user/assistant after an optional system turn)",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise InputFileError(p, line, "a chat record must end with an assistant message after a user message")
    return messages


def chat_record(p: Path, line: int, obj: dict[str, Any]) -> CorpusRecord:
    """A chat line as a record: the whole conversation in `messages`, its first exchange in the Alpaca fields.

    Tulu's top-level `source` and `id` go to `meta` (where `export --format tulu` takes them back from)."""
    messages = chat_messages(p, line, obj)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    meta = dict(meta)
    for key in ("source", "id"):
        if isinstance(obj.get(key), str) and key not in meta:
            meta[key] = obj[key]
    return CorpusRecord.from_dict({"messages": messages, "meta": meta})


def load_tasks_any(path: str | Path) -> list[SeedTask]:
    """Seed tasks from either format.

    Alpaca records sharing a `meta.task_id` (or, without one, the same instruction) become one task with
    several instances, so a corpus exported from seeds or a split turns back into the same tasks; `meta`'s
    category and `is_classification` carry over. Tasks without a task id get ids `<stem>_<n>`.
    """
    p, records = read_rows(path)
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


# ---------------------------------------------------------------- any corpus


def corpus_path(path: str | Path) -> Path:
    """The file a corpus argument names: a run directory means its corpus.jsonl."""
    p = Path(path).expanduser()
    if p.is_dir():
        corpus = p / CORPUS_FILE
        if not corpus.is_file():
            raise InputFileError(p, None, f"no {CORPUS_FILE} in this run directory (pass a corpus file)")
        return corpus
    return p


def read_rows(path: str | Path) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """(the file read, its `(line, object)` rows): JSON/JSONL, or Parquet where the line is the row number and a
    JSON-string `meta` column (as `export --format parquet` writes it) is decoded."""
    p = corpus_path(path)
    if p.suffix != ".parquet":
        return p, read_json_records(p)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(p, None, "reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except (OSError, ValueError) as e:
        raise InputFileError(p, None, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if not rows:
        raise InputFileError(p, None, "no records in file")
    out = []
    for n, row in enumerate(rows, start=1):
        if isinstance(row.get("meta"), str):
            try:
                row["meta"] = json.loads(row["meta"])
            except json.JSONDecodeError as e:
                raise InputFileError(p, n, f"column 'meta': not JSON ({e.msg})") from None
        out.append((n, {k: v for k, v in row.items() if v is not None}))
    return p, out


def load_corpus_any(
    path: str | Path, records: list[tuple[int, dict[str, Any]]] | None = None
) -> list[CorpusRecord]:
    """Corpus records from any accepted input (see the module docstring); a seed file's instances each become
    a record. `records` are the file's already-read rows, for callers that looked at them first."""
    p = corpus_path(path)
    if records is None:
        p, records = read_rows(p)
    return seed_corpus(_seed_tasks(p, records)) if is_seed_format(records[0][1]) else _alpaca(p, records)


def load_corpus_rows(path: str | Path) -> list[tuple[int, dict[str, Any], CorpusRecord]]:
    """(line, object to write back, record) for every record of a corpus.

    The object is the line as read, so curation commands (`dedup`, `select`) pass records on unchanged, extra
    keys and whole conversations included; a seed file's instances become Alpaca objects (as `load_corpus_any`
    reads them, with task id and category under `meta`), each tagged with its task's line.
    """
    p, rows = read_rows(path)
    if is_seed_format(rows[0][1]):
        tasks = _seed_tasks(p, rows)
        return [
            (line, r.to_dict(), r) for (line, _), t in zip(rows, tasks, strict=True) for r in seed_corpus([t])
        ]
    return [(line, obj, rec) for (line, obj), rec in zip(rows, _alpaca(p, rows), strict=True)]
