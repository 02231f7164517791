"""`selfinstruct filter CORPUS --out DIR`: clean an existing corpus with the heuristic and novelty filters.

Records are judged in input order, exactly as a generation run would judge them one by one: every kept
record joins the pool (after the optional `--pool` file, e.g. the seeds) before the next one is checked. The
records of one task (same `meta.task_id`, else the same text: the instances of one instruction in a
Self-Instruct corpus) are judged once and kept or dropped together.
Outputs: `kept.jsonl` (records unchanged, plus similarity metadata under `meta`), `rejected.jsonl` (one
line per rejected record, `rundir.CurationRejection`: the text, reason and stage as in a generate run's file, the
input line, nearest pool instruction and its ROUGE-L F, the record), and `summary.json` (counts by reason).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from selfinstruct.config import Section
from selfinstruct.corpus import chat_record, is_chat, is_seed_format, read_rows
from selfinstruct.errors import InputFileError, UserError
from selfinstruct.filters import CandidateFilter, Decision
from selfinstruct.filters.heuristics import FilterConfig
from selfinstruct.rundir import KEPT, REJECTED, SUMMARY, CurationRejection
from selfinstruct.store import RunDir, existing_outputs

OUTPUTS = (KEPT, REJECTED, SUMMARY)


class FilterCommandConfig(Section):
    input: str = Field(
        "",
        description="corpus to clean: Alpaca JSON/JSONL, seed JSONL, chat JSONL (all user turns), Parquet, run dir",
        json_schema_extra={"positional": True},
    )
    out: str | None = Field(None, description="output directory (default: <input stem>-filtered next to it)")
    pool: str | None = Field(
        None, description="file whose instructions form the initial pool (e.g. the seeds), same formats"
    )
    stages: list[Literal["heuristics", "rouge"]] = Field(
        ["heuristics", "rouge"],
        min_length=1,
        description="filters to apply, in this order: heuristics, rouge (or one of them)",
        json_schema_extra={"flag": "--filters"},
    )
    field: str = Field("instruction", description="record field that holds the text to filter")
    batch_size: int = Field(1024, ge=1, description="records judged (and written) per batch")
    force: bool = Field(False, description="overwrite kept.jsonl, rejected.jsonl and summary.json in --out")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="heuristic and novelty filters")


def _texts(path: Path, records: list[tuple[int, dict[str, Any]]], name: str) -> list[str]:
    """The `name` field of every record; a chat record's `instruction` is all its user turns and its `output`
    all its assistant turns (`CorpusRecord.text_of`), so a conversation is judged whole."""
    texts = []
    for line, record in records:
        value = record.get(name)
        if value is None and is_chat(record) and name in ("instruction", "input", "output"):
            value = chat_record(path, line, record).text_of(name)
        if not isinstance(value, str):
            problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
            raise InputFileError(path, line, f"field '{name}': {problem}")
        if not isinstance(record.get("meta") or {}, dict):
            raise InputFileError(
                path, line, "field 'meta': must be an object (similarity metadata goes there)"
            )
        texts.append(value)
    return texts


def _task_key(line: int, record: dict[str, Any], text: str) -> str:
    """Records of one task share `meta.task_id`, or else their text, as `selfinstruct split` groups them: a
    Self-Instruct corpus has up to 5 records per instruction, which are not copies of each other. A
    seed-format record holds a whole task by itself."""
    if is_seed_format(record):
        return f"line:{line}"
    task_id = (record.get("meta") or {}).get("task_id")
    return f"id:{task_id}" if task_id is not None else f"text:{text.strip()}"


def _kept_line(record: dict[str, Any], d: Decision) -> dict[str, Any]:
    if d.max_f is None:  # the novelty check was off: nothing to add
        return record
    meta = {**(record.get("meta") or {}), "most_similar": dict(d.nearest), "max_similarity": d.max_f}
    if d.mean_f is not None:
        meta["avg_similarity"] = d.mean_f
    return {**record, "meta": meta}


def _rejected_line(line: int, record: dict[str, Any], text: str, d: Decision) -> CurationRejection:
    nearest, score = d.nearest[0] if d.nearest else (None, d.max_f)
    return CurationRejection(
        instruction=text,
        reason=d.reason or "?",
        stage="filter",
        line=line,
        nearest=nearest,
        similarity=score,
        record=record,
    )


def filter_corpus(cfg: FilterCommandConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the filter command; return the summary that is also written to OUT/summary.json."""
    if not cfg.input:
        raise UserError("filter: give a corpus file (selfinstruct filter CORPUS --out DIR)")
    src = Path(cfg.input)
    out = Path(cfg.out) if cfg.out else src.with_name(f"{src.stem}-filtered")
    existing = existing_outputs((out / name for name in OUTPUTS), cfg.force)
    src, records = read_rows(src)
    texts = _texts(src, records, cfg.field)
    pool = _texts(*read_rows(cfg.pool), cfg.field) if cfg.pool else []
    console = console or Console(stderr=True, highlight=False)

    started = time.perf_counter()
    filt = CandidateFilter(
        cfg.filters, pool=pool, heuristics="heuristics" in cfg.stages, novelty="rouge" in cfg.stages
    )
    with RunDir(out) as run:
        for path in existing:
            path.unlink()
        kept, rejected = run.writer(KEPT), run.writer(REJECTED)
        columns = (TextColumn("filter"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("filter", total=len(records))
            judged: dict[str, Decision] = {}  # task key -> the decision on its instruction
            counts: Counter[str] = Counter()
            for start in range(0, len(records), cfg.batch_size):
                batch = records[start : start + cfg.batch_size]
                batch_texts = texts[start : start + cfg.batch_size]
                keys = [_task_key(ln, rec, text) for (ln, rec), text in zip(batch, batch_texts, strict=True)]
                new = {key: text for key, text in zip(keys, batch_texts, strict=True) if key not in judged}
                judged.update(zip(new, filt(list(new.values())), strict=True))
                pairs = [(line_rec, judged[key]) for line_rec, key in zip(batch, keys, strict=True)]
                kept.write(_kept_line(rec, d) for (_, rec), d in pairs if d.keep)
                rejected.write(
                    _rejected_line(line, rec, text, d)
                    for ((line, rec), d), text in zip(pairs, batch_texts, strict=True)
                    if not d.keep
                )
                counts.update(d.reason or "kept" for _, d in pairs)
                progress.advance(task, len(batch))
        summary = {
            "input": str(src),
            "pool": cfg.pool,
            "pool_size": len(pool),
            "field": cfg.field,
            "filters": list(cfg.stages),
            "settings": cfg.filters.model_dump(mode="json"),
            "records": len(records),
            "tasks": len(judged),
            "kept": counts["kept"],
            "rejected": len(records) - counts["kept"],
            "rejected_by_reason": {r: n for r, n in counts.most_common() if r != "kept"},
            "seconds": round(time.perf_counter() - started, 3),
            "out": str(out),
        }
        run.snapshot(SUMMARY, summary)
    return summary


def run_filter(cfg: FilterCommandConfig) -> int:
    summary = filter_corpus(cfg)
    # paths and reasons (a --extra-blacklist word) are user text: Text cells are never read as rich markup
    table = Table(title=Text(f"{summary['input']} -> {summary['out']}"), title_justify="left")
    table.add_column("outcome")
    table.add_column("records", justify="right")
    table.add_column("share", justify="right")
    total = summary["records"]
    for name, n in [("kept", summary["kept"]), *summary["rejected_by_reason"].items()]:
        table.add_row(Text(name), str(n), f"{n / total:.1%}")
    Console(highlight=False).print(table)
    print(f"{summary['kept']} kept, {summary['rejected']} rejected in {summary['seconds']:.1f} s")
    return 0
