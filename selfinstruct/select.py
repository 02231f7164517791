"""`selfinstruct select CORPUS --n 1000 --out DIR`: keep the best N records, and keep them diverse (LIMA-style).

Scorers (`--score`, higher is better for all of them; several combine into one number):

* `length`: the output's length ("Long Is More for Alignment": the longest responses make a strong baseline) in
  tokens of `--scorer-model`'s tokenizer when one is given, else in whitespace-separated words.
* `ifd`: instruction-following difficulty (Superfiltering / "From Quantity to Quality"): the perplexity of the
  output given the instruction divided by its perplexity alone, under a small causal LM (`--scorer-model`). A
  value >= 1 means the instruction does not help predict the answer (misaligned pair): such records are never
  selected (`--ifd-max`); among the rest, higher is harder and more useful.
* `judge`: an LLM rates each (instruction, input, output) from 1 to 5 with our rubric (AlpaGasus' idea), through
  the shared `[teacher]`.
* `deita`: the teacher scores instruction complexity and response quality (1-6 each) in one request; the score
  is their product (DEITA's complexity × quality).

A conversation (a record with `messages`) counts whole: its output is all its assistant turns, its instruction
all its user turns (`CorpusRecord.text_of`), and IFD scores every assistant turn in context.

Combination (`--combine`): `product` = Π score_i^weight_i (scale-free: rescaling a scorer does not change the
order), or `sum` = Σ weight_i × score_i min-max-normalised over the corpus. Ties are broken by a `--seed`ed
random order, so a selection is deterministic.

Diversity (DEITA's greedy walk): records are visited best first and one is taken only if it is not too similar
to any record taken so far, until N are taken: ROUGE-L F of the instructions at most `--max-similarity` (`rouge`,
default 0.7, the exact index the novelty filter uses), or cosine of sentence vectors of `--fields` below it
(`embed`, default 0.9 as in DEITA, encoder from `--encoder`).

Files in `--out`: `scores.jsonl` is an append-only cache, one line per (record, scorer, scoring model): a rerun
scores only what is missing (after a crash, Ctrl-C or a budget stop, or with another combination or N), and the
teacher's usage over all sessions is kept in `select_state.json` for the budgets. `selected.jsonl` holds the
chosen records unchanged apart from `meta.select` (id, rank, combined score, each scorer's score),
`select_report.json` the settings, counts and score summaries; `selfinstruct stats DIR` plots the score
distributions of selected vs other records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from selfinstruct.config import Section, optional
from selfinstruct.corpus import load_corpus_rows
from selfinstruct.dedup import SemanticIndex, known_fields, record_text
from selfinstruct.errors import UserError
from selfinstruct.pipeline.runner import NeedsEveryAnswer
from selfinstruct.records import CorpusRecord
from selfinstruct.shard import Shard, ShardSpec, shard_field
from selfinstruct.store import JsonlWriter, RunDir, atomic_write_json, atomic_write_text, read_jsonl
from selfinstruct.teachers.config import TeacherConfig

Scorer = Literal["length", "ifd", "judge", "deita"]
SCORES = "scores.jsonl"
SELECTED = "selected.jsonl"
REPORT = "select_report.json"
STATE = "select_state.json"
TEACHER_SCORERS = ("judge", "deita")
DEFAULT_MAX_SIMILARITY = {"rouge": 0.7, "embed": 0.9}
WRITE_EVERY = 64  # records scored per append to scores.jsonl (a crash loses at most this much work)

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
    "required": ["rating"],
    "additionalProperties": False,
}
DEITA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "complexity": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6]},
        "quality": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6]},
    },
    "required": ["complexity", "quality"],
    "additionalProperties": False,
}


class SelectConfig(Section):
    """The `[select]` table and the `selfinstruct select` flags."""

    input: str = Field(
        "",
        description="corpus: Alpaca JSON/JSONL, self-instruct seed JSONL, or a run directory (its corpus.jsonl)",
        json_schema_extra={"positional": True},
    )
    out: str | None = optional("output directory (default: <input stem>-select next to it); rerun to resume")
    n: int = Field(1000, ge=1, description="records to select")
    score: list[Scorer] = Field(["length"], min_length=1, description="scorers: length, ifd, judge, deita")
    weights: list[float] = Field([], description="one weight per scorer (default: all 1)")
    combine: Literal["product", "sum"] = Field(
        "product", description="product of score^weight, or weighted sum of min-max-normalised scores"
    )
    diversity: Literal["none", "rouge", "embed"] = Field(
        "none", description="greedy walk that skips records too similar to ones already selected"
    )
    max_similarity: float | None = optional(
        "most similarity allowed between two selected records (default: rouge 0.7, embed 0.9)", gt=0, le=1
    )
    fields: list[str] = Field(
        ["instruction", "input"], min_length=1, description="embed diversity: record fields compared"
    )
    encoder: str = Field(
        "auto", description="embed diversity: auto, minilm, hashed, or a sentence-transformers model"
    )
    scorer_model: str | None = optional(
        "ifd: causal LM (directory, LoRA adapter or hub id); length: its tokenizer counts tokens"
    )
    scorer_batch_size: int = Field(8, ge=1, description="ifd: sequences per forward pass")
    max_length: int = Field(1024, ge=8, description="ifd: tokens of prompt + output kept")
    ifd_max: float = Field(1.0, gt=0, description="ifd: records with IFD at or above this are never selected")
    seed: int = Field(0, description="seed for breaking score ties")
    judge_max_tokens: int = Field(32, ge=1, description="judge/deita: max tokens of the teacher's answer")
    max_requests: int | None = optional(
        "judge/deita: stop after this many teacher requests (all sessions)", ge=1
    )
    max_tokens: int | None = optional("judge/deita: stop after this many prompt + completion tokens", ge=1)
    max_cost: float | None = optional("judge/deita: stop after this much estimated cost in USD", gt=0)
    prompt_dir: str | None = optional(
        "directory with prompt templates overriding select_judge / select_deita"
    )
    shard: ShardSpec = shard_field(
        "records to score (no selection: `selfinstruct merge` the shards' --out, then select there)"
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the judge LLM")

    _known_fields = field_validator("fields")(classmethod(lambda cls, fields: known_fields(fields)))

    @model_validator(mode="after")
    def _check(self) -> SelectConfig:
        if len(set(self.score)) != len(self.score):
            raise ValueError("a scorer is listed twice")
        if self.weights and len(self.weights) != len(self.score):
            raise ValueError(f"give one weight per scorer ({len(self.score)}), got {len(self.weights)}")
        if any(w < 0 for w in self.weights):
            raise ValueError("weights must be >= 0")
        return self

    def weight_of(self) -> dict[str, float]:
        return dict(zip(self.score, self.weights or [1.0] * len(self.score), strict=True))


def record_id(record: CorpusRecord) -> str:
    """Content id: identical records share scores wherever they are in whichever corpus (a conversation by all
    its turns)."""
    content = (
        record.messages if record.messages is not None else [record.instruction, record.input, record.output]
    )
    key = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- the score cache


class ScoreCache:
    """scores.jsonl: `{"id", "scorer", "by", "score", ...}` lines; the first good line per key wins.

    New lines go to `sink`: a plain appending writer for the local scorers, the runner's group-commit `Journal`
    while the teacher answers (so the event loop never waits for an fsync)."""

    def __init__(self, run: RunDir):
        self.values: dict[tuple[str, str, str], dict[str, Any]] = {}
        for line in read_jsonl(run / SCORES):
            if line.get("score") is not None:
                self.values.setdefault((line["scorer"], line["by"], line["id"]), line)
        self.sink: Callable[[list[dict[str, Any]]], Any] = lambda lines: None

    def missing(self, scorer: str, by: str, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if (scorer, by, i) not in self.values]

    def add(self, lines: list[dict[str, Any]]) -> None:
        self.sink(lines)
        for line in lines:
            if line.get("score") is not None:
                self.values.setdefault((line["scorer"], line["by"], line["id"]), line)

    def score(self, scorer: str, by: str, rid: str) -> float | None:
        line = self.values.get((scorer, by, rid))
        return None if line is None else float(line["score"])


def _progress(console: Console | None) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console or Console(stderr=True), transient=True)


# ---------------------------------------------------------------- length and IFD (local model)


def _load_tokenizer_and_model(spec: str, with_model: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfinstruct.models import resolve_model

    path = resolve_model(spec, "--scorer-model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not with_model:
            return tokenizer, None
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if device == "cuda" else torch.float32
        ).to(device)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--scorer-model {spec}: cannot load ({first})") from None
    model.eval()
    return tokenizer, model


def length_scores(records: dict[str, CorpusRecord], tokenizer: Any) -> list[dict[str, Any]]:
    if tokenizer is None:
        return [{"id": i, "score": len(r.text_of("output").split())} for i, r in records.items()]
    return [
        {"id": i, "score": len(tokenizer(r.text_of("output"), add_special_tokens=False)["input_ids"])}
        for i, r in records.items()
    ]


def _response_nll(
    model: Any, seqs: list[tuple[list[int], list[int]]], batch_size: int, pad: int
) -> list[float]:
    """Mean NLL (nats/token) of each sequence's tokens marked 1 in its mask (never the first token); batched by
    length, right-padded."""
    import torch
    from torch.nn.functional import cross_entropy

    device = next(model.parameters()).device
    out = [math.nan] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = max(len(seqs[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            mask[row, : len(seqs[i][0])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            seq, scored = seqs[i]
            positions = [t for t in range(1, len(seq)) if scored[t]]
            if positions:  # logits at t - 1 predict token t
                at = torch.tensor(positions, device=device)
                out[i] = float(cross_entropy(logits[row, at - 1].float(), ids[row].to(device)[at]))
    return out


def _ifd_pair(
    tokenizer: Any, record: CorpusRecord, template: str, max_length: int
) -> list[tuple[list, list]]:
    """(token ids, mask of the scored tokens) of the record as `train` sees it and of its output side alone.

    A conversation of several exchanges is scored on every assistant turn in its context (`train`'s loss
    mask) against all its assistant turns alone; a single exchange on its answer."""
    from selfinstruct.evaluate import tokenize_example
    from selfinstruct.train import assistant_only_row, to_examples

    pair = []
    if record.turns > 1:
        if template != "chat":
            raise UserError("--scorer-model has no chat template: IFD of multi-turn conversations needs one")
        row = assistant_only_row(tokenizer, record.conversation())
        pair.append((row["input_ids"], row["completion_mask"]))
    else:
        ids, begin = tokenize_example(tokenizer, to_examples([record], template)[0])
        pair.append((ids, [0] * begin + [1] * (len(ids) - begin)))
    ids, begin = tokenize_example(tokenizer, {"prompt": "", "completion": record.text_of("output")})
    pair.append((ids, [0] * begin + [1] * (len(ids) - begin)))
    return [(ids[:max_length], mask[:max_length]) for ids, mask in pair]


def ifd_scores(
    records: dict[str, CorpusRecord],
    tokenizer: Any,
    model: Any,
    cfg: SelectConfig,
    emit: Callable[[list[dict[str, Any]]], None],
    advance: Callable[[int], None],
) -> None:
    """IFD = exp(mean NLL of the output given the prompt − mean NLL of the output alone).

    The prompt is rendered exactly as `selfinstruct train` would (the model's chat template, else Alpaca's), so
    the conditioned perplexity is the one fine-tuning on this record would start from. Scores are emitted every
    `WRITE_EVERY` records so an interrupted run keeps them."""
    template = "chat" if tokenizer.chat_template else "alpaca"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = list(records.items())
    for start in range(0, len(items), WRITE_EVERY):
        chunk = items[start : start + WRITE_EVERY]
        seqs = [seq for _, r in chunk for seq in _ifd_pair(tokenizer, r, template, cfg.max_length)]
        nll = _response_nll(model, seqs, cfg.scorer_batch_size, pad)
        lines = []
        for k, (rid, _) in enumerate(chunk):
            cond, direct = nll[2 * k], nll[2 * k + 1]
            ok = not (math.isnan(cond) or math.isnan(direct))
            lines.append(
                {
                    "id": rid,
                    "score": math.exp(cond - direct) if ok else None,
                    "ppl_conditioned": math.exp(cond) if ok else None,
                    "ppl_direct": math.exp(direct) if ok else None,
                }
            )
        emit(lines)
        advance(len(chunk))


# ---------------------------------------------------------------- judge and DEITA (teacher)


def parse_rating(scorer: str, text: str) -> dict[str, float] | None:
    """The numbers of a judge/deita answer: JSON first, else the first numbers in the text; None if unusable."""
    keys, top = (("rating",), 5) if scorer == "judge" else (("complexity", "quality"), 6)
    values: dict[str, float] = {}
    with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
        obj = json.loads(text.strip().removeprefix("```json").removesuffix("```"))
        if isinstance(obj, dict):
            values = {k: float(obj[k]) for k in keys if isinstance(obj.get(k), int | float)}
    if len(values) < len(keys):
        numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)][: len(keys)]
        if len(numbers) < len(keys):
            return None
        values = dict(zip(keys, numbers, strict=True))
    if not all(1 <= v <= top for v in values.values()):
        return None
    return values


class _Rater(NeedsEveryAnswer):
    """A `drive` call source: one rating request per record without a score yet."""

    def __init__(self, scorer: str, todo: dict[str, CorpusRecord], teacher: Any, template: Any, cfg, budget):
        from selfinstruct.teachers.base import Sampling

        self.scorer, self.teacher, self.template, self.budget = scorer, teacher, template, budget
        self.records = dict(todo)
        self.todo = deque(todo.items())
        self.retried: set[str] = set()
        schema = JUDGE_SCHEMA if scorer == "judge" else DEITA_SCHEMA
        self.sampling = Sampling(
            temperature=0.0, top_p=1.0, max_tokens=cfg.judge_max_tokens, json_schema=schema
        )
        self.batch = teacher.concurrency if teacher.in_process else 1
        self.http_seed = None if teacher.in_process else cfg.seed
        self.emit: Callable[[list[dict[str, Any]]], None] = lambda lines: None
        self.advance: Callable[[int], None] = lambda n: None
        self.stop_reason: str | None = None
        self.unparseable = 0

    def _sampling(self, rid: str) -> Any:
        """Over HTTP a per-request seed from `--seed` and the record (as generate does; OpenAI honours it on a
        best-effort basis); the in-process engine gets none (its engine seed already fixes it)."""
        if self.http_seed is None:
            return self.sampling
        digest = hashlib.blake2b(f"{self.http_seed}:{self.scorer}:{rid}".encode(), digest_size=4).digest()
        return dataclasses.replace(self.sampling, seed=int.from_bytes(digest, "big") >> 1)

    def next_call(self, in_flight: int) -> list[Any] | None:
        from selfinstruct.teachers.base import TeacherRequest

        if self.stop_reason is None:
            self.stop_reason = self.budget.exhausted(in_flight)
        if self.stop_reason is not None:
            return None
        left = self.budget.requests_left(in_flight)
        n = min(self.batch if left is None else min(self.batch, left), len(self.todo))
        out = []
        for _ in range(n):
            rid, r = self.todo.popleft()
            messages, _ = self.template.render(
                instruction=r.text_of("instruction"),
                input=r.text_of("input").strip() or "(none)",
                output=r.text_of("output"),
            )
            out.append(TeacherRequest(messages=messages, sampling=self._sampling(rid), tag=rid))
        return out or None

    def handle(self, responses: list[Any]) -> None:
        lines = []
        for response in responses:
            rid = response.request.tag  # a plain id: --batch-api journals tags to resume a batch
            if rid not in self.records:
                continue  # a resumed batch's answer about a record this run does not score
            if response.error is not None:
                if rid not in self.retried:
                    self.retried.add(rid)
                    self.todo.append((rid, self.records[rid]))
                continue
            text = response.choices[0].text if response.choices else ""
            values = parse_rating(self.scorer, text)
            if values is None:
                self.unparseable += 1
                lines.append({"id": rid, "score": None, "error": "unparseable", "answer": text[:200]})
            else:
                score = (
                    values["rating"] if self.scorer == "judge" else values["complexity"] * values["quality"]
                )
                lines.append({"id": rid, "score": score, **values})
        self.emit(lines)
        self.advance(len(responses))


async def _rate_all(
    teacher: Any, raters: list[_Rater], own: bool, stop: asyncio.Event, scope: Any = None
) -> bool:
    """Rate with the teacher: requests in flight (`drive`), or Batch API jobs when `scope` is given."""
    from selfinstruct.pipeline.batch import run_batches
    from selfinstruct.pipeline.runner import drive

    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        if own:
            await teacher.start()
        slots = 1 if teacher.in_process else teacher.concurrency
        for rater in raters:
            if scope is not None:
                if not await run_batches(scope, rater.scorer, rater):
                    return False
            elif not await drive(teacher, rater, slots, stop):
                return False
        return True
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if own:
            await teacher.close()


# ---------------------------------------------------------------- combining and the diversity walk


def combine(scores: dict[str, list[float]], weights: dict[str, float], how: str) -> list[float]:
    """One number per record from each scorer's list (all the same length, no missing values)."""
    names = list(scores)
    n = len(scores[names[0]])
    if how == "product":
        return [math.prod(scores[s][i] ** weights[s] if weights[s] else 1.0 for s in names) for i in range(n)]
    normed = {}
    for s in names:
        lo, hi = min(scores[s]), max(scores[s])
        normed[s] = [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in scores[s]]
    return [sum(weights[s] * normed[s][i] for s in names) for i in range(n)]


def rank_order(combined: Sequence[float], seed: int) -> list[int]:
    """Indices best first; equal scores in a seeded random order."""
    tiebreak = list(range(len(combined)))
    random.Random(seed).shuffle(tiebreak)
    return sorted(range(len(combined)), key=lambda i: (-combined[i], tiebreak[i]))


def diverse_walk(
    order: Sequence[int],
    texts: Sequence[str],
    n: int,
    diversity: str,
    max_similarity: float,
    encoder: Any = None,
    chunk: int = 256,
) -> tuple[list[int], int]:
    """DEITA's greedy walk: take records in `order` whose similarity to all taken ones is <= max_similarity,
    until `n` are taken. Returns (taken, how many were skipped as too similar)."""
    if diversity == "none":
        return list(order[:n]), 0
    if diversity == "rouge":
        from selfinstruct.filters.rouge import NoveltyIndex

        index = NoveltyIndex(max_similarity, top_k=0)

        def keep(batch: list[str]) -> list[bool]:
            return [r.keep for r in index.query(batch)]
    else:
        semantic = SemanticIndex(encoder, max_similarity)

        def keep(batch: list[str]) -> list[bool]:
            return [hit is None for hit in semantic.judge(batch, add=True)]

    taken: list[int] = []
    skipped = 0
    for start in range(0, len(order), chunk):
        ids = list(order[start : start + chunk])
        for i, ok in zip(ids, keep([texts[i] for i in ids]), strict=True):
            if len(taken) == n:
                return taken, skipped
            if ok:
                taken.append(i)
            else:
                skipped += 1
    return taken, skipped


# ---------------------------------------------------------------- the command


def _by(cfg: SelectConfig, scorer: str, template_hash: str | None) -> str:
    """What a cached score depends on besides the record."""
    if scorer == "length":
        return f"tokens:{cfg.scorer_model}" if cfg.scorer_model else "words"
    if scorer == "ifd":
        return f"{cfg.scorer_model}|max_length={cfg.max_length}"
    return f"{cfg.teacher.model}|{template_hash}"


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def select(cfg: SelectConfig, teacher: Any = None, console: Console | None = None) -> dict[str, Any]:
    """Score (what is not cached), combine, walk, write; returns the report also written to select_report.json.

    `teacher` may be an already-started teacher for judge/deita (tests, notebooks); it is not closed."""
    if not cfg.input:
        raise UserError("select: give a corpus (selfinstruct select CORPUS --n N --out DIR)")
    if {"ifd"} & set(cfg.score) and not cfg.scorer_model:
        raise UserError("--score ifd needs --scorer-model (a small causal LM, e.g. a GPT-2-sized model)")
    src = Path(cfg.input)
    out = Path(cfg.out) if cfg.out else src.with_name(f"{src.stem}-select")
    rows = load_corpus_rows(src)
    records = [r for _, _, r in rows]
    ids = [record_id(r) for r in records]
    unique = dict(zip(ids, records, strict=True))
    shard = Shard.parse(cfg.shard)
    to_score = unique if shard is None else {i: r for i, r in unique.items() if shard.owns(i)}
    max_similarity = cfg.max_similarity or DEFAULT_MAX_SIMILARITY.get(cfg.diversity, 1.0)
    templates = {}
    teacher_scorers = [s for s in cfg.score if s in TEACHER_SCORERS]
    if teacher_scorers:
        from selfinstruct.prompts import Prompts

        if cfg.teacher.api != "chat":
            raise UserError("--score judge/deita need a chat teacher (--api chat)")
        prompts = Prompts("chat", cfg.prompt_dir)
        templates = {s: prompts.get(f"select_{s}") for s in teacher_scorers}
    started = time.perf_counter()
    stop_reason: str | None = None
    unparseable = 0
    with RunDir(out) as run, _progress(console) as progress:
        cache = ScoreCache(run)
        by = {s: _by(cfg, s, templates[s].hash if s in templates else None) for s in cfg.score}

        def emitter(scorer: str) -> Callable[[list[dict[str, Any]]], None]:
            return lambda lines: cache.add([{"scorer": scorer, "by": by[scorer], **line} for line in lines])

        local = [s for s in cfg.score if s in ("length", "ifd")]
        writer = JsonlWriter(run / SCORES)
        cache.sink = writer.write
        if local:
            todo = {s: cache.missing(s, by[s], list(to_score)) for s in local}
            tokenizer = model = None
            if cfg.scorer_model and any(todo.values()):
                tokenizer, model = _load_tokenizer_and_model(
                    cfg.scorer_model, with_model=bool(todo.get("ifd"))
                )
            if todo.get("length"):
                emitter("length")(length_scores({i: unique[i] for i in todo["length"]}, tokenizer))
            if todo.get("ifd"):
                task = progress.add_task("ifd", total=len(todo["ifd"]))
                ifd_scores(
                    {i: unique[i] for i in todo["ifd"]},
                    tokenizer,
                    model,
                    cfg,
                    emitter("ifd"),
                    lambda n: progress.advance(task, n),
                )
        writer.close()
        if teacher_scorers:
            stop_reason, unparseable = _teacher_scoring(
                cfg, run, cache, by, to_score, templates, teacher_scorers, teacher, progress, emitter
            )
        if shard is not None:  # a share of the scoring only: the selection needs every record's scores
            missing = sum(len(cache.missing(s, by[s], list(to_score))) for s in cfg.score)
            report = {
                "input": str(src),
                "shard": str(shard),
                "scored_records": len(to_score),
                "unscored": missing,
                "stop_reason": stop_reason,
                "complete": stop_reason is None and not missing,
                "teacher_usage": _usage(run) if teacher_scorers else None,
                "out": str(out),
            }
            run.snapshot(REPORT, report)
            return report

        # combine, exclude, rank, walk
        excluded: dict[str, int] = {}
        eligible = []
        for k, rid in enumerate(ids):
            values = {s: cache.score(s, by[s], rid) for s in cfg.score}
            if any(v is None for v in values.values()):
                excluded["unscored"] = excluded.get("unscored", 0) + 1
            elif "ifd" in values and values["ifd"] >= cfg.ifd_max:  # type: ignore[operator]
                excluded["ifd_too_high"] = excluded.get("ifd_too_high", 0) + 1
            else:
                eligible.append(k)
        weights = cfg.weight_of()
        combined = (
            combine(
                {s: [cache.score(s, by[s], ids[k]) for k in eligible] for s in cfg.score},
                weights,
                cfg.combine,
            )  # type: ignore[misc]
            if eligible
            else []
        )
        order = [eligible[j] for j in rank_order(combined, cfg.seed)]
        score_of = {eligible[j]: combined[j] for j in range(len(eligible))}
        encoder = None
        if cfg.diversity == "embed":
            from selfinstruct.embed import make_encoder

            encoder = make_encoder(cfg.encoder)
            encoder.fit([record_text(records[k], cfg.fields) for k in eligible])
        texts = [
            r.text_of("instruction") if cfg.diversity == "rouge" else record_text(r, cfg.fields)
            for r in records
        ]
        taken, too_similar = diverse_walk(order, texts, cfg.n, cfg.diversity, max_similarity, encoder)
        lines = []
        for rank, k in enumerate(taken, start=1):
            obj = dict(rows[k][1])
            meta = dict(obj.get("meta") or {})
            meta["select"] = {
                "id": ids[k],
                "rank": rank,
                "score": score_of[k],
                "scores": {s: cache.score(s, by[s], ids[k]) for s in cfg.score},
            }
            lines.append(json.dumps({**obj, "meta": meta}, ensure_ascii=False) + "\n")
        atomic_write_text(run / SELECTED, "".join(lines))
        selected_scores = [score_of[k] for k in taken]
        report = {
            "input": str(src),
            "records": len(rows),
            "unique_records": len(unique),
            "n": cfg.n,
            "selected": len(taken),
            "scorers": {s: {"by": by[s], "weight": weights[s]} for s in cfg.score},
            "combine": cfg.combine,
            "diversity": cfg.diversity,
            "max_similarity": max_similarity if cfg.diversity != "none" else None,
            "encoder": getattr(encoder, "name", None),
            "seed": cfg.seed,
            "eligible": len(eligible),
            "excluded": excluded,
            "skipped_too_similar": too_similar,
            "unparseable_answers": unparseable,
            "stop_reason": stop_reason,
            "complete": stop_reason is None and "unscored" not in excluded,
            "combined_score": {"selected": _summary(selected_scores), "all": _summary(combined)},
            "per_scorer": {
                s: {
                    "selected": _summary([cache.score(s, by[s], ids[k]) for k in taken]),  # type: ignore[misc]
                    "all": _summary([cache.score(s, by[s], ids[k]) for k in eligible]),  # type: ignore[misc]
                }
                for s in cfg.score
            },
            "teacher_usage": _usage(run) if teacher_scorers else None,
            "seconds": round(time.perf_counter() - started, 3),
            "out": str(out),
        }
        run.snapshot(REPORT, report)
    return report


def _usage(run: RunDir) -> dict[str, Any] | None:
    """Teacher requests, tokens and estimated cost over all sessions of this output directory."""
    path = run / STATE
    return json.loads(path.read_text(encoding="utf-8")).get("usage") if path.is_file() else None


def _teacher_scoring(cfg, run, cache, by, unique, templates, scorers, teacher, progress, emitter):
    """Rate what is missing with the teacher (judge and/or deita); returns (stop reason, unparseable answers)."""
    from selfinstruct.pipeline.runner import Budget, Journal
    from selfinstruct.teachers import make_teacher

    state_path = run / STATE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    todo = {s: {i: unique[i] for i in cache.missing(s, by[s], list(unique))} for s in scorers}
    if not any(todo.values()):
        return None, 0
    own = teacher is None
    the_teacher = teacher or make_teacher(cfg.teacher)
    budget = Budget.resumed(cfg, state.get("usage", {}), the_teacher.stats)
    raters = []
    for s in scorers:
        rater = _Rater(s, todo[s], the_teacher, templates[s], cfg, budget)
        task = progress.add_task(s, total=len(todo[s]))
        rater.emit, rater.advance = emitter(s), (lambda n, t=task: progress.advance(t, n))
        raters.append(rater)
    journal = Journal(run, [SCORES])
    cache.sink = lambda lines: journal.append(SCORES, lines)
    stop = asyncio.Event()
    scope = None
    if cfg.teacher.batch_api:
        from selfinstruct.pipeline.batch import BatchScope

        scope = BatchScope(run, the_teacher, journal, stop, cfg.teacher.batch_poll)
    try:
        completed = asyncio.run(_rate_all(the_teacher, raters, own, stop, scope))
    finally:
        journal.close()
        atomic_write_json(state_path, {"usage": vars(budget.total())})
    reason = next((r.stop_reason for r in raters if r.stop_reason), None)
    if not completed:
        reason = "interrupted"
    return reason, sum(r.unparseable for r in raters)


def run_select(cfg: SelectConfig) -> int:
    report = select(cfg)
    if "shard" in report:
        print(
            f"shard {report['shard']}: scored {report['scored_records'] - report['unscored']} of "
            f"{report['scored_records']} records -> {report['out']}/{SCORES} (merge the shards, then select)"
        )
        return 130 if report["stop_reason"] == "interrupted" else 0
    excluded = ", ".join(f"{k} {v}" for k, v in report["excluded"].items()) or "none"
    print(
        f"selected {report['selected']} of {report['records']} records (excluded: {excluded}; "
        f"skipped as too similar: {report['skipped_too_similar']}) -> {report['out']}/{SELECTED}"
    )
    if report["stop_reason"]:
        print(f"scoring stopped early ({report['stop_reason']}): rerun the same command to finish it")
    return 130 if report["stop_reason"] == "interrupted" else 0


# ---------------------------------------------------------------- for `selfinstruct stats`


def selection_stats(path: Path) -> dict[str, Any] | None:
    """Per-scorer score lists of selected vs other records, when `path` (or its directory) is a select output."""
    directory = path if path.is_dir() else path.parent
    report_path = directory / REPORT
    if not report_path.is_file() or not (directory / SCORES).is_file():
        return None
    report = json.loads(report_path.read_text(encoding="utf-8"))
    chosen = {
        (line.get("meta") or {}).get("select", {}).get("id") for line in read_jsonl(directory / SELECTED)
    }
    out: dict[str, Any] = {"selected": len(chosen), "scorers": {}}
    for scorer, info in report.get("scorers", {}).items():
        values: dict[str, float] = {}
        for line in read_jsonl(directory / SCORES):
            if (
                line.get("scorer") == scorer
                and line.get("by") == info["by"]
                and line.get("score") is not None
            ):
                values.setdefault(line["id"], float(line["score"]))
        out["scorers"][scorer] = {
            "selected": [v for i, v in values.items() if i in chosen],
            "other": [v for i, v in values.items() if i not in chosen],
        }
    return out
