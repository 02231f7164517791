"""`selfinstruct templatize`: FLAN-style instruction records from a labelled dataset and a template file.

FLAN and promptsource turn existing NLP datasets into instructions by rendering each row through one of several
natural-language templates: Jinja text whose part before `|||` is the prompt and whose part after it is the
target. Classification tasks list their `answer_choices`; a share of the prompts shows them as an `OPTIONS:`
list, and "reversed" templates turn a task around (write the review, given its sentiment). Few-shot prompts put
rendered rows of the same task before the query.

A template file is YAML:

    task: sentiment_reviews        # the task name (meta.task)
    cluster: sentiment             # the task cluster; `split --holdout-categories` holds out whole clusters
    description: Is a review positive or negative?   # optional, for people reading the file
    columns: {text: sentence}      # template variable -> dataset column (dotted paths reach into nested values)
    answer_choices: [negative, positive]   # or {column: choices} for per-row choices; omit for free text
    templates:
      - id: feeling
        template: "{{ text }}\\nHow does the reviewer feel? ||| {{ answer_choices[label] }}"
      - id: write_review
        reverse: true              # turned around: the target is free text, not a label
        only_if: "label == 1"      # optional: rows this template applies to (a Jinja expression)
        template: ...

Templates render in a sandbox with undefined variables as errors, so a typo in a column name fails up front
with the list of columns the dataset has. Each output record is Alpaca-shaped (the prompt is the instruction,
the target the output) with `meta = {task, cluster, template_id, shots, options, source_row}` plus the names
`split` and `evaluate` read: `category` (the cluster), `task_id` (the task) and `is_classification`.
"""

from __future__ import annotations

import csv
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfinstruct.config import Section
from selfinstruct.corpus import read_json_records
from selfinstruct.errors import UserError
from selfinstruct.prompts import PROMPT_DIR
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_write_text, existing_outputs

FLAN_DIR = PROMPT_DIR / "flan"
SEPARATOR = "|||"
SHOT_SEPARATOR = "\n\n"  # between few-shot examples, and before the query
TARGET_SEPARATOR = "\n"  # between an example's prompt and its target
OPTIONS_HEADER = "OPTIONS:"


class TemplatizeConfig(Section):
    """The `[templatize]` table and the `selfinstruct templatize` flags."""

    source: str | None = Field(
        None,
        description="labelled data: a CSV, JSON/JSONL or Parquet file, or a Hugging Face dataset name or "
        "directory (a data directory or one written by save_to_disk; offline from local files and the cache)",
        json_schema_extra={"positional": True},
    )
    template: str | None = Field(
        None, description="template file (YAML) or the name of a shipped one, e.g. sentiment, nli"
    )
    out: str | None = Field(None, description="output JSONL of Alpaca records")
    column: list[str] = Field([], description="map a template variable to a dataset column: VAR=COLUMN")
    subset: str | None = Field(None, description="Hugging Face dataset configuration name")
    split: str = Field("train", description="Hugging Face dataset split")
    task: str | None = Field(None, description="task name (default: the template file's)")
    cluster: str | None = Field(None, description="task cluster (default: the template file's)")
    shots: str = Field(
        "0", description="few-shot examples per prompt: K, or A-B for a uniform draw per record (0-8)"
    )
    options_ratio: float = Field(
        0.5, ge=0, le=1, description="share of classification prompts that list the OPTIONS"
    )
    max_per_task: int | None = Field(
        None, gt=0, description="at most this many records (a seeded sample of the rows)"
    )
    seed: int = Field(0, description="seed for row sampling, template choice, shots and options")
    force: bool = Field(False, description="overwrite an existing --out file")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: str) -> str:
        parse_shots(v)
        return v


def parse_shots(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (1, 0)
    if not m or low > high or high > 8:
        raise ValueError("expected K or A-B with 0 <= A <= B <= 8")
    return low, high


# ---------------------------------------------------------------- template files


class _TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1)
    template: str
    reverse: bool = False
    only_if: str | None = None


class _FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task: str = Field(min_length=1)
    cluster: str = Field(min_length=1)
    description: str = ""
    columns: dict[str, str] = Field(default_factory=dict)
    answer_choices: list[str] | dict[str, str] | None = None
    templates: list[_TemplateIn] = Field(min_length=1)


class _BadLabel(Exception):
    """Raised inside a render (not a LookupError, which Jinja would turn into an undefined value)."""


class Choices(list):
    """`answer_choices` as templates see it: `answer_choices[label]` takes an index (also as digits, as CSV
    gives it) or the label text itself; anything else is an error instead of Python's negative indexing."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return list.__getitem__(self, key)
        if isinstance(key, str) and key in self:
            return key
        index = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(self):
            return list.__getitem__(self, index)
        raise _BadLabel(f"label {key!r} is neither an index of answer_choices nor one of them")


@dataclass
class _Template:
    id: str
    reverse: bool
    render: Callable[..., str]
    uses_options: bool
    only_if: Callable[..., Any] | None
    variables: frozenset[str]  # the names it reads, for error messages


@dataclass
class TemplateFile:
    path: str
    task: str
    cluster: str
    columns: dict[str, str]
    choices: list[str] | None  # fixed answer choices
    choices_column: str | None  # or per-row choices from this column
    templates: list[_Template]
    variables: set[str]  # every variable the templates read


def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def resolve_template_path(spec: str) -> Path:
    """A file path, or the name of a shipped template (`sentiment` -> selfinstruct/prompts/flan/sentiment.yaml)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = FLAN_DIR / f"{spec}.yaml"
    if "/" not in spec and shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in FLAN_DIR.glob("*.yaml")))
    raise UserError(f"--template {spec}: no such file and not a shipped template ({names})")


def load_template_file(spec: str) -> TemplateFile:
    import yaml
    from jinja2 import TemplateSyntaxError, meta

    path = resolve_template_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read template file ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping with task, cluster and templates")
    try:
        spec_in = _FileIn.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        msg = "missing required field" if err["type"] == "missing" else err["msg"].lower()
        raise UserError(f"{path}: field '{field}': {msg}") from None
    choices_column = None
    if isinstance(spec_in.answer_choices, dict):
        if set(spec_in.answer_choices) != {"column"}:
            raise UserError(f"{path}: answer_choices must be a list or {{column: NAME}}")
        choices_column = spec_in.answer_choices["column"]
    env = _environment()
    templates: list[_Template] = []
    variables: set[str] = set()
    seen: set[str] = set()
    for t in spec_in.templates:
        if t.id in seen:
            raise UserError(f"{path}: template id '{t.id}' appears twice")
        seen.add(t.id)
        if t.template.count(SEPARATOR) != 1:
            raise UserError(f"{path}: template '{t.id}' needs exactly one '{SEPARATOR}' (prompt ||| target)")
        try:
            ast = env.parse(t.template)
            render = env.from_string(ast).render
            only_if = env.compile_expression(t.only_if, undefined_to_none=False) if t.only_if else None
            used = meta.find_undeclared_variables(ast)
            if t.only_if:
                used |= meta.find_undeclared_variables(env.parse("{{ " + t.only_if + " }}"))
        except TemplateSyntaxError as e:
            raise UserError(f"{path}: template '{t.id}': Jinja syntax error: {e.message}") from None
        variables |= used
        templates.append(_Template(t.id, t.reverse, render, "options" in used, only_if, frozenset(used)))
    fixed = list(spec_in.answer_choices) if isinstance(spec_in.answer_choices, list) else None
    return TemplateFile(
        str(path),
        spec_in.task,
        spec_in.cluster,
        dict(spec_in.columns),
        fixed,
        choices_column,
        templates,
        variables - {"answer_choices", "options"},
    )


# ---------------------------------------------------------------- sources


def _csv_value(text: str) -> Any:
    """CSV cells are text; whole numbers become ints so `answer_choices[label]` works as with JSON."""
    return int(text) if re.fullmatch(r"0|-?[1-9]\d*", text) else text


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more cells than header columns")
                rows.append({k: _csv_value(v) if v is not None else "" for k, v in row.items()})
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}: invalid CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet sources need pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None


def _read_hf(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: not a file; Hugging Face datasets need `pip install datasets`") from None
    datasets.disable_progress_bars()
    path = Path(name).expanduser()
    # `load_dataset` refuses what `save_to_disk` wrote: such a directory has its own loader
    saved = any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
    if saved and subset:
        raise UserError(f"{name}: --subset does not apply to a directory written by save_to_disk")
    try:
        ds = (
            datasets.load_from_disk(str(path))
            if saved
            else datasets.load_dataset(name, name=subset, split=split)
        )
    except Exception as e:  # offline misses, unknown splits, bad configs: all the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{name}: cannot load as a file or a Hugging Face dataset ({type(e).__name__}: {first})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{name}: no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds.to_list()


def read_rows(source: str, subset: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """The rows of a CSV, JSON/JSONL or Parquet file, else of a Hugging Face dataset: a name (the hub, or its
    cache offline), a data directory, or a directory written by `save_to_disk`."""
    path = Path(source).expanduser()
    if not path.exists() and path.suffix.lower() in (".csv", ".json", ".jsonl", ".parquet"):
        raise UserError(f"{source}: file not found")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            rows = _read_csv(path)
        elif suffix in (".json", ".jsonl"):
            rows = [obj for _, obj in read_json_records(path)]
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise UserError(f"{path}: unknown file type (expected .csv, .json, .jsonl or .parquet)")
    else:
        rows = _read_hf(source, subset, split)
    if not rows:
        raise UserError(f"{source}: no rows")
    return rows


# ---------------------------------------------------------------- rendering


def _getter(path: str) -> Callable[[dict[str, Any]], Any]:
    """`a.b.0` reads row["a"]["b"][0]; a missing step raises KeyError."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    if len(keys) == 1:
        key = keys[0]
        return lambda row: row[key]

    def get(row: dict[str, Any]) -> Any:
        value: Any = row
        for k in keys:
            try:
                value = value[k]
            except (LookupError, TypeError):
                raise KeyError(path) from None
        return value

    return get


class Renderer:
    """Renders rows of one source through one template file; every check that can fail up front does."""

    def __init__(
        self, spec: TemplateFile, rows: list[dict[str, Any]], overrides: dict[str, str], source: str
    ):
        self.spec, self.rows, self.source = spec, rows, source
        available = sorted(rows[0])
        mapping = {**spec.columns, **overrides}
        for t in spec.templates:
            for var in sorted(t.variables - {"answer_choices", "options"}):
                if var not in mapping and var not in rows[0]:
                    raise UserError(
                        f"{spec.path}: template '{t.id}' uses unknown column '{var}' (available columns: "
                        f"{', '.join(available)}; or map it with --column {var}=COLUMN)"
                    )
        for var, column in sorted(mapping.items()):
            if column.split(".")[0] not in rows[0]:
                raise UserError(
                    f"{source}: no column '{column}' for '{var}' (available columns: {', '.join(available)})"
                )
        if spec.choices_column and spec.choices_column not in rows[0]:
            raise UserError(
                f"{spec.path}: answer_choices column '{spec.choices_column}' not in {source} "
                f"(available columns: {', '.join(available)})"
            )
        # only the variables the templates read: a smaller context renders faster
        self.columns = {var: mapping.get(var, var) for var in sorted(spec.variables)}
        self.getters = {var: _getter(col) for var, col in self.columns.items()}
        self._cache: dict[tuple[int, int, bool], tuple[str, str]] = {}

    def context(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        ctx: dict[str, Any] = {}
        for var, get in self.getters.items():
            try:
                value = get(row)
                ctx[var] = "" if value is None else value  # a null cell is empty text, never "None"
            except KeyError:
                raise UserError(
                    f"{self.source}: row {i}: no value at '{self.columns[var]}' "
                    f"(available columns: {', '.join(sorted(row))})"
                ) from None
        ctx["answer_choices"] = self.choices(i)
        return ctx

    def choices(self, i: int) -> Choices | None:
        if self.spec.choices_column is None:
            return Choices(self.spec.choices) if self.spec.choices is not None else None
        value = self.rows[i].get(self.spec.choices_column)
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise UserError(
                f"{self.source}: row {i}: answer_choices column '{self.spec.choices_column}' must hold a "
                "non-empty list of strings"
            )
        return Choices(value)

    def eligible(self, i: int) -> list[int]:
        """Indices of the templates that apply to row i (all but those whose `only_if` is false)."""
        conditional = [k for k, t in enumerate(self.spec.templates) if t.only_if]
        if not conditional:
            return list(range(len(self.spec.templates)))
        ctx = self.context(i)
        return [k for k, t in enumerate(self.spec.templates) if not t.only_if or self._test(t, ctx, i)]

    def _test(self, t: _Template, ctx: dict[str, Any], i: int) -> bool:
        from jinja2 import UndefinedError

        try:
            return bool(t.only_if(**ctx))  # type: ignore[misc]
        except (UndefinedError, _BadLabel) as e:
            raise UserError(f"{self.spec.path}: template '{t.id}' only_if, row {i}: {e}") from None

    def render(self, i: int, k: int, options: bool) -> tuple[str, str]:
        """(prompt, target) of row i through template k; cached, since few-shot prompts reuse rows."""
        key = (i, k, options)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from jinja2 import TemplateError, UndefinedError

        t = self.spec.templates[k]
        ctx = self.context(i)
        choices = ctx["answer_choices"]
        option_text = OPTIONS_HEADER + "".join(f"\n- {c}" for c in choices) if options and choices else ""
        ctx["options"] = option_text
        where = f"{self.source}: row {i}: template '{t.id}'"
        try:
            text = t.render(ctx)
        except UndefinedError as e:
            raise UserError(
                f"{where}: {e.message} (available columns: {', '.join(sorted(self.rows[i]))})"
            ) from None
        except _BadLabel as e:
            raise UserError(f"{where}: {e} ({', '.join(choices or [])})") from None
        except TemplateError as e:
            raise UserError(f"{where}: {e}") from None
        prompt, _, target = text.partition(SEPARATOR)
        prompt, target = prompt.strip(), target.strip()
        if not prompt or not target:
            raise UserError(f"{where}: renders an empty {'prompt' if not prompt else 'target'}")
        if choices is not None and not t.reverse and target not in choices:
            raise UserError(f"{where}: target {target!r} is not one of answer_choices ({', '.join(choices)})")
        if option_text and not t.uses_options:
            prompt = f"{prompt}\n\n{option_text}"
        self._cache[key] = prompt, target
        if len(self._cache) > 100_000:  # bound memory on big sources; only few-shot reuse needs it
            self._cache.clear()
        return prompt, target


def templatize_rows(
    spec: TemplateFile,
    rows: list[dict[str, Any]],
    *,
    source: str = "source",
    overrides: dict[str, str] | None = None,
    shots: tuple[int, int] = (0, 0),
    options_ratio: float = 0.5,
    max_per_task: int | None = None,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[CorpusRecord]:
    """One record per selected row, in source order; every random choice comes from one seeded generator."""
    renderer = Renderer(spec, rows, overrides or {}, source)
    rng = random.Random(f"{seed}:{spec.task}")
    n = len(rows)
    selected = (
        range(n) if not max_per_task or max_per_task >= n else sorted(rng.sample(range(n), max_per_task))
    )
    if shots[1] and n < 2:
        raise UserError(f"{source}: few-shot prompts need at least 2 rows")
    records = []
    for done, i in enumerate(selected, start=1):
        eligible = renderer.eligible(i)
        if not eligible:
            continue
        k = eligible[rng.randrange(len(eligible))] if len(eligible) > 1 else eligible[0]
        t = spec.templates[k]
        classification = renderer.choices(i) is not None and not t.reverse
        options = classification and rng.random() < options_ratio
        n_shots = min(rng.randint(*shots) if shots[1] else 0, n - 1)
        prompt, target = renderer.render(i, k, options)
        if n_shots:
            examples = []
            for j in rng.sample(range(n - 1), n_shots):
                j += j >= i  # skip the query row itself
                usable = k if k in renderer.eligible(j) else None
                if usable is None:
                    continue
                ex_prompt, ex_target = renderer.render(j, k, options)
                examples.append(f"{ex_prompt}{TARGET_SEPARATOR}{ex_target}")
            prompt = SHOT_SEPARATOR.join([*examples, prompt])
            n_shots = len(examples)
        meta = {
            "task": spec.task,
            "cluster": spec.cluster,
            "template_id": t.id,
            "shots": n_shots,
            "options": options,
            "source_row": i,
            "category": spec.cluster,
            "task_id": spec.task,
            "is_classification": classification,
        }
        records.append(CorpusRecord(prompt, "", target, meta))
        if on_progress and done % 1000 == 0:
            on_progress(done)
    return records


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        var, sep, column = item.partition("=")
        if not sep or not var.strip() or not column.strip():
            raise UserError(f"--column {item}: expected VAR=COLUMN")
        out[var.strip()] = column.strip()
    return out


def to_jsonl(records: list[CorpusRecord]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def templatize(cfg: TemplatizeConfig) -> dict[str, Any]:
    """Render cfg.source through cfg.template into cfg.out (atomically); return a summary."""
    if not cfg.source:
        raise UserError("templatize needs a SOURCE (a data file or a Hugging Face dataset name)")
    if not cfg.template:
        raise UserError("templatize needs --template (a YAML file or a shipped name)")
    if not cfg.out:
        raise UserError("templatize needs --out FILE.jsonl")
    out = Path(cfg.out)
    existing_outputs([out], cfg.force)
    overrides = _overrides(cfg.column)
    spec = load_template_file(cfg.template)
    if cfg.task:
        spec.task = cfg.task
    if cfg.cluster:
        spec.cluster = cfg.cluster
    started = time.perf_counter()
    rows = read_rows(cfg.source, cfg.subset, cfg.split)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = min(len(rows), cfg.max_per_task or len(rows))
    columns = (TextColumn("templatize"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("templatize", total=total)
        records = templatize_rows(
            spec,
            rows,
            source=cfg.source,
            overrides=overrides,
            shots=parse_shots(cfg.shots),
            options_ratio=cfg.options_ratio,
            max_per_task=cfg.max_per_task,
            seed=cfg.seed,
            on_progress=lambda done: progress.update(bar, completed=done),
        )
    if not records:
        raise UserError(f"{cfg.source}: no row matched any template's only_if")
    atomic_write_text(out, to_jsonl(records))
    seconds = time.perf_counter() - started
    return {"task": spec.task, "cluster": spec.cluster, "rows": len(rows), "records": len(records),
            "seconds": seconds, "out": str(out)}  # fmt: skip


def run_templatize(cfg: TemplatizeConfig) -> int:
    s = templatize(cfg)
    print(
        f"wrote {s['records']} records of task {s['task']} (cluster {s['cluster']}) from {s['rows']} rows "
        f"to {s['out']} in {s['seconds']:.1f} s"
    )
    return 0
