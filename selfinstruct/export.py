"""`selfinstruct export`: write a corpus in the shape a trainer or the Hugging Face hub expects, with a card.

The source is a run directory (its `corpus.jsonl`, plus provenance from `summary.json` and `config.toml`) or
any Alpaca JSON/JSONL file. The source is never modified; each output is written atomically (temp file +
rename) and an existing file is only replaced with `--force`.

Several formats exported into one directory share one dataset card `README.md`, with one hub `configs` entry
per file. The card remembers what it describes in a trailing HTML comment, so a second export updates it
instead of failing or clobbering it; a `README.md` this command did not write is only replaced with `--force`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import string
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from selfinstruct.config import Section, load_toml, redact
from selfinstruct.corpus import load_corpus_any
from selfinstruct.errors import InputFileError, UserError
from selfinstruct.prompts import read_template
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_path, atomic_write_text, existing_outputs

Format = Literal["alpaca", "alpaca-json", "messages", "sharegpt", "tulu", "parquet"]

DEFAULT_FILE: dict[str, str] = {
    "alpaca": "alpaca.jsonl",
    "alpaca-json": "alpaca.json",
    "messages": "messages.jsonl",
    "sharegpt": "sharegpt.jsonl",
    "tulu": "tulu.jsonl",
    "parquet": "alpaca.parquet",
}
CHAT_FORMATS = ("messages", "sharegpt", "tulu")
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportConfig(Section):
    source: str = Field(
        "",
        description="run directory (its corpus.jsonl is exported) or a corpus file (Alpaca, seed, chat JSONL "
        "with any number of turns, Parquet)",
        json_schema_extra={"positional": True},
    )
    format: Format = Field("alpaca", description="output format")
    out: str | None = Field(
        None,
        description="output file or existing directory "
        "(default: RUN/export/<file>, or <corpus stem>-export/<file> next to a corpus file)",
    )
    force: bool = Field(
        False, description="replace an existing export file, and a README.md not written by selfinstruct"
    )
    keep_meta: bool = Field(
        False, description="keep each record's `meta` provenance (a JSON string column in Parquet)"
    )
    system: str | None = Field(
        None, description="system prompt put before every conversation without one (messages, sharegpt, tulu)"
    )
    card: bool = Field(True, description="write a dataset card README.md next to the export")
    name: str | None = Field(None, description="dataset name in the card (default: the run or corpus name)")
    language: list[str] = Field(["en"], description="language codes for the card's hub metadata")
    license: str | None = Field(
        None, description="license id for the card's hub metadata (e.g. cc-by-nc-4.0); unset = a placeholder"
    )


# ---------------------------------------------------------------- the source


@dataclass
class Source:
    """What is exported, and what is known about how it was made."""

    name: str
    corpus: Path
    records: list[CorpusRecord]
    fingerprint: str  # of the corpus bytes: tells whether two exports hold the same data
    default_dir: Path
    is_run: bool
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None  # config.toml, redacted once more in case it was hand-edited


def load_source(path: str | Path) -> Source:
    """Read a run directory or a corpus file; every problem is a one-line `UserError`."""
    p = Path(path)
    if p.is_dir():
        corpus = p / "corpus.jsonl"
        if not corpus.is_file():
            raise UserError(
                f"{p}: no corpus.jsonl in this run directory yet "
                "(rerun `selfinstruct generate` with the same --out to finish it)"
            )
        summary = _read_json_object(p / "summary.json") if (p / "summary.json").is_file() else None
        config = redact(load_toml(p / "config.toml")) if (p / "config.toml").is_file() else None
        name, default_dir, is_run = p.resolve().name, p / "export", True
    elif p.exists():
        corpus, summary, config = p, None, None
        name, default_dir, is_run = p.stem, p.parent / f"{p.stem}-export", False
    else:
        raise UserError(f"{p}: no such run directory or corpus file")
    records = load_corpus_any(corpus)
    fingerprint = hashlib.sha256(corpus.read_bytes()).hexdigest()[:16]
    return Source(name, corpus, records, fingerprint, default_dir, is_run, summary, config)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(path, getattr(e, "lineno", None), f"cannot read ({e})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, None, "expected a JSON object")
    return data


# ---------------------------------------------------------------- records -> rows


def to_row(
    record: CorpusRecord,
    fmt: str,
    *,
    system: str | None = None,
    keep_meta: bool = False,
    conversations: bool = False,
    key: str = "",
    source: str = "",
) -> dict:
    """One output row of `fmt` (`parquet` rows are the Alpaca rows, with `meta` as a JSON string).

    `messages` rows are TRL's prompt/completion pairs, or with `conversations` (a corpus with several-turn
    records) whole `messages` lists, which TRL trains on every assistant turn of. `tulu` rows are Tulu 3's
    `{id, messages, source}`: `key` and `source` stand in for a record without `meta.id` / `meta.source`.
    """
    chat = record.conversation()
    if system and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": system})
    if fmt == "messages":
        row: dict[str, Any] = (
            {"messages": chat} if conversations else {"prompt": chat[:-1], "completion": chat[-1:]}
        )
    elif fmt == "sharegpt":
        row = {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in chat]}
    elif fmt == "tulu":
        row = {
            "id": str(record.meta.get("id") or key),
            "messages": chat,
            "source": str(record.meta.get("source") or source),
        }
    else:
        row = {"instruction": record.instruction, "input": record.input, "output": record.output}
    if keep_meta:
        meta = record.meta
        if fmt == "tulu":  # id and source are the row's own fields (and come back from there on import)
            meta = {k: v for k, v in meta.items() if k not in ("id", "source")}
        row["meta"] = json.dumps(meta, ensure_ascii=False) if fmt == "parquet" else meta
    return row


def write_rows(path: Path, fmt: str, rows: list[dict]) -> None:
    """Write atomically: a reader (or a crash) sees the old file or the complete new one."""
    if fmt == "parquet":
        _write_parquet(path, rows)
    elif fmt == "alpaca-json":
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    else:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("--format parquet needs pyarrow (pip install pyarrow)") from None
    table = pa.table({col: pa.array([r[col] for r in rows], pa.string()) for col in rows[0]})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------- statistics


def _word_stats(texts: Iterable[str]) -> dict[str, float] | None:
    counts = sorted(len(t.split()) for t in texts)
    if not counts:
        return None
    p90 = counts[math.ceil(0.9 * len(counts)) - 1]  # nearest rank: an actual record's length
    return {
        "n": len(counts),
        "mean": statistics.fmean(counts),
        "median": statistics.median(counts),
        "p90": p90,
        "max": counts[-1],
    }


def corpus_stats(records: list[CorpusRecord]) -> dict[str, Any]:
    """Counts and word-length statistics; input lengths cover only records that have an input."""
    with_input = [r for r in records if r.input.strip()]
    labels = [r.meta.get("is_classification") for r in records]
    return {
        "records": len(records),
        "instructions": len({r.instruction for r in records}),
        "with_input": len(with_input),
        "origins": dict(Counter(r.meta["origin"] for r in records if r.meta.get("origin"))),
        "classification": sum(x is True for x in labels) if any(x is not None for x in labels) else None,
        "lengths": {
            "instruction": _word_stats(r.instruction for r in records),
            "input": _word_stats(r.input for r in with_input),
            "output": _word_stats(r.output for r in records),
        },
    }


# ---------------------------------------------------------------- the dataset card

_MANIFEST = re.compile(r"<!-- selfinstruct-export (\{.*\}) -->")

FORMAT_DOCS = {
    "alpaca": 'JSON lines, one `{"instruction", "input", "output"}` object per line (`input` is "" when '
    "the task has none)",
    "alpaca-json": "one JSON array of `{instruction, input, output}` objects, the shape of the original "
    "Stanford Alpaca release",
    "messages": "JSON lines in TRL's conversational prompt-completion format: `prompt` holds the user message "
    "(the instruction, then a blank line and the input when there is one) and `completion` the assistant's "
    "answer (the output)",
    "sharegpt": "JSON lines of ShareGPT / OpenHermes `conversations` of `{from, value}` turns: `system` when "
    "there is one, then `human` (the instruction, then a blank line and the input when there is one) and `gpt` "
    "(the answer) alternating",
    "tulu": "JSON lines in Tulu 3's shape: `id`, `messages` (`{role, content}` turns) and `source`",
    "parquet": "Parquet with string columns `instruction`, `input`, `output`",
}

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]


def size_category(n: int) -> str:
    return next((label for limit, label in _SIZE_CATEGORIES if n < limit), "1M<n<10M")


def _read_manifest(card: Path, force: bool) -> dict[str, Any]:
    """What an existing card of ours describes ({} if none); a README.md we did not write needs --force."""
    if not card.exists():
        return {}
    match = _MANIFEST.search(card.read_text(encoding="utf-8", errors="replace"))
    try:
        manifest = json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("exports"), list):
        if not force:
            raise UserError(
                f"{card}: exists and was not written by selfinstruct export "
                "(use --force to replace it, or --no-card)"
            )
        return {}
    return manifest


def _merge_exports(previous: list[Any], entry: dict[str, Any], card_dir: Path) -> list[dict[str, Any]]:
    """The exports the card describes after this one: files of the same corpus still present, plus this one
    (in place of an earlier export to the same file, so the default config stays first)."""
    entries, replaced = [], False
    for old in previous:
        if not (
            isinstance(old, dict) and isinstance(old.get("file"), str) and old.get("format") in DEFAULT_FILE
        ):
            continue
        if old["file"] == entry["file"]:
            entries.append(entry)
            replaced = True
        elif not (card_dir / old["file"]).is_file():
            continue
        elif old.get("fingerprint") != entry["fingerprint"]:
            print(f"note: the card no longer lists {old['file']} (exported from other data)", file=sys.stderr)
        else:
            entries.append({**entry, **old})  # keys a hand edit removed fall back to this export's values
    return entries if replaced else [*entries, entry]


def _builder(entry: dict[str, Any]) -> str:
    """The `datasets` builder that reads an export."""
    return "parquet" if entry["file"].endswith(".parquet") else "json"


def _hub_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exports listed as hub `configs`: `datasets` reads a repository with one builder, so JSON files
    (the trainable chat formats among them) win over Parquet when both are present."""
    builder = "json" if any(_builder(e) == "json" for e in entries) else "parquet"
    return [e for e in entries if _builder(e) == builder]


def _yaml(obj: dict[str, Any], pad: str = "") -> list[str]:
    """Block-style YAML for the front matter; JSON scalars are valid YAML scalars, so json.dumps quotes."""
    lines = []
    for key, value in obj.items():
        if not isinstance(value, list):
            lines.append(f"{pad}{key}: {json.dumps(value, ensure_ascii=False)}")
            continue
        lines.append(f"{pad}{key}:")
        for item in value:
            if isinstance(item, dict):
                sub = _yaml(item, pad + "  ")
                lines += [f"{pad}- {sub[0][len(pad) + 2 :]}", *sub[1:]]
            else:
                lines.append(f"{pad}- {json.dumps(item, ensure_ascii=False)}")
    return lines


def _front_matter(cfg: ExportConfig, src: Source, title: str, entries: list[dict[str, Any]]) -> str:
    """Hub metadata: one `configs` entry per hub-readable export, the first one the default."""
    meta: dict[str, Any] = {"pretty_name": title, "language": cfg.language}
    if cfg.license:
        meta["license"] = cfg.license
    meta |= {
        "task_categories": ["text-generation"],
        "size_categories": [size_category(len(src.records))],
        "tags": ["instruction-tuning", *(["synthetic", "self-instruct"] if src.is_run else [])],
        "configs": [
            {
                "config_name": e["format"],
                **({"default": True} if i == 0 else {}),
                "data_files": [{"split": "train", "path": e["file"]}],
            }
            for i, e in enumerate(_hub_entries(entries))
        ],
    }
    return "\n".join(_yaml(meta))


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "-"


def _counts_table(stats: dict[str, Any]) -> str:
    n = stats["records"]
    rows = [
        ("records", n),
        ("distinct instructions", stats["instructions"]),
        ("records with an input", stats["with_input"]),
    ]
    rows += [(f"origin: {origin}", k) for origin, k in sorted(stats["origins"].items())]
    if stats["classification"] is not None:
        rows.append(("classification tasks", stats["classification"]))
    return "\n".join(f"| {label} | {k} | {_pct(k, n)} |" for label, k in rows)


def _lengths_table(stats: dict[str, Any]) -> str:
    lines = []
    for field, s in stats["lengths"].items():
        if s is None:
            lines.append(f"| {field} | 0 | - | - | - | - |")
        else:
            lines.append(
                f"| {field} | {s['n']} | {s['mean']:.1f} | {s['median']:g} | {s['p90']} | {s['max']} |"
            )
    return "\n".join(lines)


def _summary_text(src: Source) -> str:
    if not src.is_run:
        return f"It was read from the corpus file `{src.corpus.name}`."
    pipeline = (src.summary or {}).get("pipeline") or "self-instruct"
    text = (
        f"A teacher model grew it from seed tasks with the {pipeline} pipeline of `selfinstruct generate`, "
        "which drops candidates that fail heuristic filters or are too similar (ROUGE-L) to an instruction "
        "already kept."
    )
    if src.summary is not None and not src.summary.get("finished", False):
        text += "\n\n**This is a snapshot of an unfinished run**: more records may follow."
    return text


def _distinct(records: list[CorpusRecord], key: str) -> str:
    counts = Counter(str(r.meta[key]) for r in records if r.meta.get(key))
    return ", ".join(f"`{v}`" for v, _ in counts.most_common())


def _num(summary: dict[str, Any], key: str, spec: str = "") -> str:
    value = summary.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return format(value, spec) if ok else "?"


def _generation_lines(summary: dict[str, Any]) -> list[str]:
    """What `summary.json` says about the run; a missing or odd value shows as '?' rather than failing."""
    rejected = summary.get("rejected_by_reason")
    rejected = (
        {str(k): v for k, v in rejected.items() if isinstance(v, int)} if isinstance(rejected, dict) else {}
    )
    top = ", ".join(f"{reason} {k}" for reason, k in sorted(rejected.items(), key=lambda x: -x[1])[:8])
    return [
        f"- Kept instructions: {_num(summary, 'kept')} of {_num(summary, 'candidates')} candidates; "
        f"rejected {sum(rejected.values())}" + (f" ({top})" if top else ""),
        f"- Unparseable completions: {_num(summary, 'parse_failures')}",
        f"- Teacher requests: {_num(summary, 'requests')} ({_num(summary, 'failed_requests')} failed, "
        f"{_num(summary, 'retries')} retries); tokens: {_num(summary, 'prompt_tokens')} prompt + "
        f"{_num(summary, 'completion_tokens')} completion; cost: ${_num(summary, 'cost', '.2f')}; "
        f"time: {_num(summary, 'elapsed_s', '.0f')} s",
        f"- Run finished: {'yes' if summary.get('finished') is True else 'no'}",
    ]


def _provenance(src: Source) -> str:
    summary, config = src.summary or {}, src.config or {}
    teacher = summary.get("teacher_model") or config.get("teacher", {}).get("model")
    teacher = f"`{teacher}`" if teacher else _distinct(src.records, "teacher_model")
    pipeline = summary.get("pipeline") or config.get("generate", {}).get("pipeline")
    pipeline = f"`{pipeline}`" if pipeline else _distinct(src.records, "pipeline")
    lines = [f"- Teacher model: {teacher or 'unknown'}", f"- Pipeline: {pipeline or 'unknown'}"]
    if summary:
        lines += _generation_lines(summary)
    if config:
        import tomli_w

        settings = {k: v for k, v in config.get("generate", {}).items() if not isinstance(v, dict | list)}
        teacher_cfg = config.get("teacher", {})
        settings |= {
            f"teacher.{k}": teacher_cfg[k]
            for k in ("backend", "model", "api", "structured_output")
            if k in teacher_cfg
        }
        if settings:
            lines.append(
                "- Key settings: " + ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in settings.items())
            )
        lines += [
            "",
            "<details><summary>Full configuration (config.toml, secrets redacted)</summary>",
            "",
            "```toml",
            tomli_w.dumps(config).strip(),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(lines)


def _files(entries: list[dict[str, Any]]) -> str:
    lines, hub = [], _hub_entries(entries)
    for e in entries:
        doc = FORMAT_DOCS[e["format"]]
        if e.get("system"):
            doc += "; every conversation starts with the same system message"
        if e.get("keep_meta"):
            doc += "; a `meta` field keeps each record's provenance"
        where = (
            f"config `{e['format']}`"
            if e in hub
            else "not in `configs`: the hub reads one file type per repository"
        )
        lines.append(f"- `{e['file']}` ({e['records']} rows; {where}): {doc}.")
    return "\n".join(lines)


def _loading(entries: list[dict[str, Any]]) -> str:
    code = ["```python", "from datasets import load_dataset", ""]
    for e in entries:
        var = e["format"].replace("-", "_")
        code.append(f'{var} = load_dataset("{_builder(e)}", data_files="{e["file"]}", split="train")')
    code += [
        "",
        "# once pushed to the hub, by config name:",
        f'# load_dataset("<user>/<dataset>", "{_hub_entries(entries)[0]["format"]}", split="train")',
        "```",
    ]
    messages = next((e["file"] for e in entries if e["format"] == "messages"), None)
    if messages:
        code += [
            "",
            f"`{messages}` is ready for TRL's `SFTTrainer`, which applies the model's chat template and by "
            "default computes the loss on the completion only:",
            "",
            "```python",
            "from trl import SFTConfig, SFTTrainer",
            "",
            'trainer = SFTTrainer(model="<base model>", train_dataset=messages, args=SFTConfig(output_dir="sft"))',
            "trainer.train()",
            "```",
        ]
    return "\n".join(code)


def _license(cfg: ExportConfig) -> str:
    caveat = (
        "The outputs of some teacher models come with terms of use that restrict training competing models; "
        "check those of the teacher before publishing."
    )
    if cfg.license:
        return f"Released under `{cfg.license}`. {caveat}"
    return f"_License not set yet: choose one and export again with `--force --license <id>`._ {caveat}"


def render_card(cfg: ExportConfig, src: Source, entries: list[dict[str, Any]]) -> str:
    stats = corpus_stats(src.records)
    title = cfg.name or src.name
    card_settings = {"name": cfg.name, "license": cfg.license}
    manifest = {"exports": entries, **{k: v for k, v in card_settings.items() if v is not None}}
    manifest = json.dumps(manifest, ensure_ascii=False, sort_keys=True)
    manifest = manifest.replace("<", "\\u003c").replace(">", "\\u003e")  # cannot close the comment early
    template = string.Template(read_template("dataset_card.md"))
    return template.substitute(
        front_matter=_front_matter(cfg, src, title, entries),
        title=title,
        records=stats["records"],
        instructions=stats["instructions"],
        summary=_summary_text(src),
        counts_table=_counts_table(stats),
        lengths_table=_lengths_table(stats),
        provenance=_provenance(src),
        files=_files(entries),
        loading=_loading(entries),
        license=_license(cfg),
        manifest=f"<!-- selfinstruct-export {manifest} -->",
    )


# ---------------------------------------------------------------- the command


def _out_path(cfg: ExportConfig, src: Source) -> Path:
    if cfg.out is None:
        return src.default_dir / DEFAULT_FILE[cfg.format]
    out = Path(cfg.out)
    return out / DEFAULT_FILE[cfg.format] if out.is_dir() or cfg.out.endswith(os.sep) else out


def run_export(cfg: ExportConfig) -> int:
    if not cfg.source:
        raise UserError(
            "export: give a run directory or a corpus file (selfinstruct export RUN --format ...)"
        )
    if cfg.system is not None and cfg.format not in CHAT_FORMATS:
        raise UserError(f"--system applies only to --format {' or '.join(CHAT_FORMATS)} (got {cfg.format})")
    src = load_source(cfg.source)
    out = _out_path(cfg, src)
    if out.resolve() == src.corpus.resolve():
        raise UserError(f"{out}: is the corpus being exported; choose another --out")
    existing_outputs([out], cfg.force)
    card = out.parent / "README.md"
    if cfg.card:
        entry = {
            "file": out.name,
            "format": cfg.format,
            "records": len(src.records),
            "fingerprint": src.fingerprint,
            "system": bool(cfg.system),
            "keep_meta": cfg.keep_meta,
        }
        previous = _read_manifest(card, cfg.force)  # checked before anything is written
        entries = _merge_exports(previous.get("exports", []), entry, card.parent)
        # --name and --license given once stay on the card until changed
        kept = {k: previous[k] for k in ("name", "license") if getattr(cfg, k) is None and previous.get(k)}
        card_cfg = cfg.model_copy(update=kept)

    conversations = any(r.turns > 1 for r in src.records)
    if conversations and cfg.format not in CHAT_FORMATS:
        several = sum(r.turns > 1 for r in src.records)
        raise UserError(
            f"{src.corpus}: {several} records are conversations with several turns, which --format {cfg.format} "
            f"cannot hold; use --format {', '.join(CHAT_FORMATS)}"
        )
    rows = [
        to_row(
            r,
            cfg.format,
            system=cfg.system,
            keep_meta=cfg.keep_meta,
            conversations=conversations,
            key=f"{src.name}_{k}",
            source=src.name,
        )
        for k, r in enumerate(src.records)
    ]
    write_rows(out, cfg.format, rows)
    print(f"wrote {len(rows)} records to {out} ({cfg.format})")
    if cfg.card:
        atomic_write_text(card, render_card(card_cfg, src, entries))
        print(f"wrote dataset card {card}")
    return 0
