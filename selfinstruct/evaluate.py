"""`selfinstruct evaluate`: whether tuning helped on held-out tasks (made by `selfinstruct split`).

Self-Instruct measures success as following instructions the model never saw, including whole task types it
never saw (`split` holds those out). `evaluate` answers the held-out instructions greedily with the tuned model and its base and scores them three ways:

* ROUGE-L F against the reference (SuperNI / Self-Instruct's metric: rouge-score semantics, Porter stemming),
  computed with the same exact tokenizer and F formula as the novelty filter;
* exact match after normalisation (case, punctuation, articles, whitespace) for classification tasks, whose
  answers are labels;
* the mean log-loss of the reference response under the model (nats per response token, and perplexity),
  with the prompt rendered and tokenized exactly as `selfinstruct train` does, so it is the quantity that
  training minimised, measured on held-out data.

A conversation (`messages` with several assistant turns, e.g. from `converse` or `magpie --turns`) is scored
turn by turn with the gold history: the prompt of assistant turn k is the conversation up to and including user
turn k (earlier assistant turns are the reference's, not the model's), and its reference is assistant turn k.
Its log-loss is taken on the token spans `selfinstruct train` puts its loss on (`assistant_spans`). Metrics are
also reported per turn index. Conversations need the chat template: the Alpaca template holds one instruction
and one answer, and `train` never trains an Alpaca model on conversations either.

Both models see the same prompts: the template (chat or Alpaca) comes from the tuned model's
`train_config.toml` when it has one. Models are named as everywhere (`selfinstruct.models`): a LoRA adapter is
merged into its base (once, in the model cache) and a GGUF file converted, so vLLM and transformers load a plain
model.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from selfinstruct.config import Section
from selfinstruct.errors import UserError
from selfinstruct.models import resolve_model
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_write_json, atomic_write_text
from selfinstruct.teachers.config import TeacherConfig

UNCATEGORIZED = "uncategorized"


def category_of(record: CorpusRecord) -> str:
    return str(record.meta.get("category") or UNCATEGORIZED)


def task_of(record: CorpusRecord) -> str:
    """Instances of one task share `meta.task_id`; records without one are grouped by instruction text (a
    conversation's first user turn; `converse` and `magpie` give each conversation a task id of its own)."""
    task_id = record.meta.get("task_id")
    return f"id:{task_id}" if task_id is not None else f"text:{record.instruction.strip()}"


def load_records(path: str) -> list[CorpusRecord]:
    """The records (with `meta`) of any corpus `selfinstruct.corpus` reads, as `train` loads them: single
    exchanges and conversations (`messages` kept whole)."""
    from selfinstruct.train import load_corpus

    return load_corpus(path)[1]


# ---------------------------------------------------------------- metrics


@lru_cache(maxsize=2)
def _rouge_tokenizer(use_stemmer: bool):
    from selfinstruct.filters.rouge import make_tokenizer

    return make_tokenizer("rouge", use_stemmer)


def rouge_l(prediction: str, reference: str, *, use_stemmer: bool = True) -> float:
    """rouge-score's `RougeScorer(["rougeL"], use_stemmer).score(reference, prediction)["rougeL"].fmeasure`."""
    from rapidfuzz.distance import LCSseq

    from selfinstruct.filters.rouge import rouge_fmeasure

    tokenize = _rouge_tokenizer(use_stemmer)
    pred, ref = tokenize(prediction), tokenize(reference)
    ids: dict[str, int] = {}
    lcs = LCSseq.similarity(
        [ids.setdefault(t, len(ids)) for t in pred], [ids.setdefault(t, len(ids)) for t in ref]
    )
    # precision = LCS / |prediction|, recall = LCS / |reference|, as rouge-score names them.
    return rouge_fmeasure(lcs, len(ref), len(pred))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace (SQuAD/SuperNI style)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


# ---------------------------------------------------------------- prompts and response log-loss


def examples_for(records: list[CorpusRecord], template: Literal["chat", "alpaca"]) -> list[dict[str, Any]]:
    """Prompt/completion pairs exactly as `selfinstruct train` builds them."""
    from selfinstruct.train import to_examples

    return to_examples(records, template)


def turn_examples(
    records: list[CorpusRecord], template: Literal["chat", "alpaca"], data: str
) -> list[dict[str, Any]]:
    """One prompt/completion example per assistant turn, in record then turn order, each with `record` (its
    index in `records`) and `turn` (1-based). A single exchange is the example `train` builds; turn k of a
    conversation has the gold history up to user turn k as its prompt and assistant turn k as its completion."""
    several = sum(r.turns > 1 for r in records)
    if several and template != "chat":
        raise UserError(
            f"{data}: {several} records are conversations with several turns, which need the chat template "
            "(a model with one, or --template chat); the Alpaca template holds one instruction and one answer"
        )
    examples = []
    for i, r in enumerate(records):
        if r.turns == 1:
            examples.append({**examples_for([r], template)[0], "record": i, "turn": 1})
            continue
        messages = r.conversation()
        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, k in enumerate(answers, start=1):
            examples.append(
                {"prompt": messages[:k], "completion": messages[k : k + 1], "record": i, "turn": turn}
            )
    return examples


def tokenize_example(tokenizer: Any, example: dict[str, Any]) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens), the way TRL's SFTTrainer tokenizes a
    prompt/completion example: chat prompts get the generation prompt, plain completions get EOS appended,
    and the response starts where the tokenized prompt and prompt + completion first differ."""
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    else:
        if not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=prompt + completion)["input_ids"]
    shared = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        shared += 1
    return list(full_ids), shared


@dataclass
class Loss:
    """Summed negative log-likelihood (nats) of one example's response tokens, and how many there were."""

    nll: float
    tokens: int


# token ids, and the [start, end) spans of the response tokens whose NLL is wanted
Row = tuple[list[int], list[tuple[int, int]]]


def _cut(ids: list[int], spans: list[tuple[int, int]], max_length: int) -> Row:
    """The row cut at `max_length` tokens. The first token is never predicted, so a span starts at 1 at the
    earliest; a span cut away entirely scores no tokens."""
    ids = ids[:max_length]
    return ids, [(max(1, min(a, len(ids))), min(b, len(ids))) for a, b in spans]


def _scorer(model_path: str) -> tuple[Any, Any]:
    """(tokenizer, model) for the log-loss: float32 on CPU, the checkpoint's dtype on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype="auto" if device == "cuda" else torch.float32
    ).to(device)
    model.eval()
    return AutoTokenizer.from_pretrained(model_path), model


def _span_losses(tokenizer: Any, model: Any, rows: list[Row], batch_size: int) -> list[list[Loss]]:
    """The NLL of every span of every row.

    Rows are batched by length with right padding; only the spans' logits are turned into float32
    log-probabilities, so memory stays at one batch of logits in the model's dtype.
    """
    import torch
    from torch.nn.functional import cross_entropy

    losses = [[Loss(0.0, 0)] * len(spans) for _, spans in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = rows[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, i in enumerate(batch):
                for k, (start, end) in enumerate(rows[i][1]):
                    if start < end:  # logits at t predict token t + 1
                        nll = cross_entropy(
                            logits[row, start - 1 : end - 1].float(),
                            ids[row, start:end].to(model.device),
                            reduction="sum",
                        )
                        losses[i][k] = Loss(float(nll), end - start)
    return losses


def response_losses(
    model_path: str, examples: list[dict[str, Any]], *, max_length: int = 2048, batch_size: int = 4
) -> list[Loss]:
    """NLL of each prompt/completion example's response under the model (cut at `max_length` tokens)."""
    tokenizer, model = _scorer(model_path)
    rows = []
    for e in examples:
        ids, start = tokenize_example(tokenizer, e)
        rows.append(_cut(ids, [(start, len(ids))], max_length))
    return [spans[0] for spans in _span_losses(tokenizer, model, rows, batch_size)]


def turn_losses(
    model_path: str,
    records: list[CorpusRecord],
    template: Literal["chat", "alpaca"],
    *,
    max_length: int = 2048,
    batch_size: int = 4,
) -> list[Loss]:
    """NLL of every assistant turn of every record, in `turn_examples` order, on the tokens `selfinstruct train`
    puts its loss on: a single exchange as its prompt/completion example, a conversation on its assistant-turn
    spans in one pass over the whole conversation (turn k sees the gold turns before it), cut between exchanges
    where longer than `max_length` as train cuts it."""
    from selfinstruct.train import assistant_spans, split_conversation

    tokenizer, model = _scorer(model_path)
    rows = []
    for r in records:
        if r.turns == 1:
            ids, start = tokenize_example(tokenizer, examples_for([r], template)[0])
            rows.append(_cut(ids, [(start, len(ids))], max_length))
            continue
        for piece in split_conversation(tokenizer, r.conversation(), max_length):
            rows.append(_cut(*assistant_spans(tokenizer, piece), max_length))
    return [loss for spans in _span_losses(tokenizer, model, rows, batch_size) for loss in spans]


# ---------------------------------------------------------------- models


def _train_settings(model: str) -> dict[str, Any]:
    """The `[train]` table a `selfinstruct train` output directory carries (empty for other models)."""
    from selfinstruct.config import load_toml

    path = Path(model).expanduser() / "train_config.toml"
    return load_toml(path).get("train", {}) if path.is_file() else {}


def _default_base(model: str) -> str | None:
    """The model a tuned directory was trained from: its train_config.toml, or its adapter's base."""
    base = _train_settings(model).get("model")
    adapter = Path(model).expanduser() / "adapter_config.json"
    if base is None and adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return base


# ---------------------------------------------------------------- evaluate


class EvalTeacherConfig(TeacherConfig):
    """How answers are generated: the teacher settings, with the in-process vLLM engine as the default.

    Evaluate answers with --model and --base, never with the `[teacher]` table's model (in a shared config that
    is the generation teacher); the field stays so that table loads.
    """

    backend: Literal["openai", "vllm"] = Field(
        "vllm",
        description="vllm: answer in-process with vLLM; openai: ask an OpenAI-compatible endpoint "
        "(see --served-model)",
        json_schema_extra={"flag": "--teacher"},
    )
    model: str = Field(
        "",
        description="not used by evaluate (it answers with --model and --base)",
        json_schema_extra={"flag": None},
    )


class EvaluateConfig(Section):
    """The `[evaluate]` table and the `selfinstruct evaluate` flags."""

    model: str | None = Field(
        None,
        description="tuned model: a directory (full model or LoRA adapter, e.g. train's --out), hub id, .gguf "
        "file or built-in name",
    )
    base: str | None = Field(
        None,
        description="base model to compare with, named as --model (default: the one --model was trained from, "
        "if recorded)",
    )
    data: str | None = Field(
        None,
        description="held-out records: Alpaca JSON/JSONL (e.g. split's heldout.jsonl), chat JSONL "
        "(conversations are scored turn by turn) or a run directory",
    )
    train_data: str | None = Field(
        None, description="the training corpus: categories absent from it are reported as unseen"
    )
    prefs: str | None = Field(
        None,
        description="held-out preference pairs (prefs.jsonl): report preference accuracy, the share of pairs "
        "whose chosen answer the model finds more likely than the rejected one (--data becomes optional)",
    )
    out: str | None = Field(None, description="output directory (default: MODEL/eval for a local model)")
    served_model: str | None = Field(
        None,
        description="--teacher openai: the name the endpoint serves the tuned model under (default: --model)",
    )
    served_base: str | None = Field(
        None,
        description="--teacher openai: the name the endpoint serves the base model under (default: --base)",
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="prompt format; auto = the one --model was trained with, else as train chooses it",
    )
    max_tokens: int = Field(256, gt=0, description="longest answer generated, in tokens")
    max_examples: int | None = Field(
        None, gt=0, description="evaluate on a seeded random sample of this many held-out records"
    )
    seed: int = Field(0, description="seed for --max-examples sampling")
    rouge_stemmer: bool = Field(
        True, description="Porter-stem words before ROUGE-L (as SuperNI's evaluation)"
    )
    loss: bool = Field(
        True, description="compute the response log-loss with transformers (needs the weights)"
    )
    loss_batch_size: int = Field(4, gt=0, description="examples per forward pass for the log-loss")
    max_length: int = Field(2048, gt=0, description="tokens of prompt + response kept for the log-loss")
    teacher: EvalTeacherConfig = Field(default_factory=EvalTeacherConfig)


@dataclass
class _Model:
    role: str  # "tuned" or "base"
    spec: str  # as the user gave it
    path: str  # what transformers and in-process vLLM load (a merged copy for an adapter)
    served: str  # its name at an OpenAI-compatible endpoint


def _models(cfg: EvaluateConfig) -> list[_Model]:
    """--model and --base (default: the model --model was trained from), resolved to loadable paths."""
    model_spec = str(cfg.model)
    base_spec = cfg.base
    if not base_spec and Path(model_spec).expanduser().is_dir():
        base_spec = _default_base(model_spec)
        if base_spec:
            print(f"comparing with base model {base_spec} (recorded in {model_spec})", file=sys.stderr)
    models = [_Model("tuned", model_spec, "", cfg.served_model or model_spec)]
    if base_spec:
        models.append(_Model("base", base_spec, "", cfg.served_base or base_spec))
    for m in models:  # all of them before any engine starts: a bad path fails in seconds
        m.path = resolve_model(m.spec, f"--{'model' if m.role == 'tuned' else 'base'}")
    return models


@dataclass
class _Scored:
    prediction: str
    rouge_l: float
    exact_match: bool | None
    loss: Loss | None


async def _answers(teacher: Any, examples: list[dict[str, Any]], max_tokens: int) -> list[str]:
    """Greedy answers to every prompt; a request that failed for good answers "" (and is counted)."""
    from selfinstruct.teachers import Sampling, TeacherRequest

    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    requests = [
        TeacherRequest(messages=e["prompt"], sampling=sampling)
        if isinstance(e["prompt"], list)
        else TeacherRequest(prompt=e["prompt"], sampling=sampling)
        for e in examples
    ]
    responses = await teacher.generate(requests)
    failed = [r.error for r in responses if r.error]
    if failed and len(failed) == len(responses):
        raise UserError(f"{teacher.model}: every answer failed (first: {failed[0]})")
    if failed:
        print(f"{len(failed)} of {len(responses)} answers failed (first: {failed[0]})", file=sys.stderr)
    return [r.choices[0].text.strip() if r.choices else "" for r in responses]


async def _answers_from(cfg: EvaluateConfig, model: _Model, examples: list[dict[str, Any]]) -> list[str]:
    """Start a teacher for one model from `cfg.teacher`, answer, and shut it down (freeing the engine)."""
    from selfinstruct.teachers import make_teacher, teacher_class

    served = model.path if teacher_class(cfg.teacher).in_process else model.served
    teacher = make_teacher(cfg.teacher.model_copy(update={"model": served}))
    try:
        await teacher.start()
        return await _answers(teacher, examples, cfg.max_tokens)
    finally:
        await teacher.close()


def _aggregate(rows: list[_Scored]) -> dict[str, Any]:
    classification = [r.exact_match for r in rows if r.exact_match is not None]
    losses = [r.loss for r in rows if r.loss is not None]
    tokens = sum(x.tokens for x in losses)
    log_loss = sum(x.nll for x in losses) / tokens if tokens else None
    return {
        "rouge_l": sum(r.rouge_l for r in rows) / len(rows),
        "exact_match": sum(classification) / len(classification) if classification else None,
        "classification_examples": len(classification),
        "log_loss": log_loss,
        "perplexity": math.exp(log_loss) if log_loss is not None else None,
        "response_tokens": tokens,
    }


def _template(cfg: EvaluateConfig, model_path: str) -> Literal["chat", "alpaca"]:
    if cfg.template != "auto":
        return cfg.template
    trained = _train_settings(str(cfg.model)).get("template")
    if trained in ("chat", "alpaca"):
        return trained
    from transformers import AutoTokenizer

    from selfinstruct.train import end_of_turn

    return "chat" if end_of_turn(AutoTokenizer.from_pretrained(model_path)) else "alpaca"


def _check(cfg: EvaluateConfig) -> Path:
    """Required settings; returns the output directory."""
    if not cfg.model:
        raise UserError("evaluate needs --model (a model directory, LoRA adapter directory or hub id)")
    if not cfg.data and not cfg.prefs:
        raise UserError(
            "evaluate needs --data (held-out records, e.g. the heldout.jsonl of selfinstruct split) or --prefs "
            "(held-out preference pairs)"
        )
    local = Path(cfg.model).expanduser()
    if not cfg.out and not local.is_dir():
        raise UserError("evaluate needs --out when --model is not a local directory")
    return Path(cfg.out) if cfg.out else local / "eval"


def evaluate(cfg: EvaluateConfig, teachers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Answer and score the held-out records with --model (and --base); write eval.json, eval.md and
    predictions.jsonl to the output directory and return what eval.json holds (plus `out`).

    `teachers` may map "tuned" / "base" to already-started teachers to answer with instead of starting one
    from `cfg.teacher` (e.g. an engine the caller still needs); evaluate does not close them.
    """
    out = _check(cfg)
    if not cfg.data:
        models = _models(cfg)
        result = {"models": {m.role: m.spec for m in models}, "preferences": preference_section(cfg, models)}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", result)
        atomic_write_text(out / "eval.md", render_markdown(result))
        return {**result, "out": str(out)}
    records = load_records(str(cfg.data))
    positions = list(range(len(records)))  # each record's place in --data: a conversation's id
    if cfg.max_examples and cfg.max_examples < len(records):
        positions = sorted(random.Random(cfg.seed).sample(positions, cfg.max_examples))
        records = [records[i] for i in positions]
    train_records = load_records(cfg.train_data) if cfg.train_data else None
    train_categories = {category_of(r) for r in train_records} if train_records is not None else None
    overlap = None
    if train_records is not None:  # held-out records the model trained on measure memorisation
        from selfinstruct.dedup import train_overlap, warn_overlap

        overlap = train_overlap(records, train_records)
        warn_overlap(overlap)
    models = _models(cfg)
    template = _template(cfg, models[0].path)
    examples = turn_examples(records, template, str(cfg.data))
    owners = [records[e["record"]] for e in examples]
    references = [
        e["completion"] if isinstance(e["completion"], str) else e["completion"][0]["content"]
        for e in examples
    ]
    scored: dict[str, list[_Scored]] = {}
    done: dict[str, tuple[list[str], list[Loss | None]]] = {}  # by path: a model given twice runs once
    for m in models:
        if m.path not in done:
            print(f"answering {len(examples)} held-out prompts with {m.spec} ...", file=sys.stderr)
            if teachers and m.role in teachers:
                answers = asyncio.run(_answers(teachers[m.role], examples, cfg.max_tokens))
            else:
                answers = asyncio.run(_answers_from(cfg, m, examples))
            losses: list[Loss | None] = [None] * len(examples)
            if cfg.loss:
                losses = list(
                    turn_losses(
                        m.path, records, template, max_length=cfg.max_length, batch_size=cfg.loss_batch_size
                    )
                )
            done[m.path] = answers, losses
        answers, losses = done[m.path]
        scored[m.role] = [
            _Scored(
                prediction=answer,
                rouge_l=rouge_l(answer, reference, use_stemmer=cfg.rouge_stemmer),
                exact_match=exact_match(answer, reference) if record.meta.get("is_classification") else None,
                loss=loss,
            )
            for answer, reference, record, loss in zip(answers, references, owners, losses, strict=True)
        ]

    categories = [category_of(r) for r in owners]
    turns = [e["turn"] for e in examples]
    unseen = [train_categories is not None and c not in train_categories for c in categories]
    result = {
        "models": {m.role: m.spec for m in models},
        "data": cfg.data,
        "train_data": cfg.train_data,
        "template": template,
        "settings": {
            "max_tokens": cfg.max_tokens,
            "rouge_stemmer": cfg.rouge_stemmer,
            "max_length": cfg.max_length,
        },
        "records": len(records),
        **_slices(scored, categories, unseen, train_categories is not None, turns),
        "train_overlap": overlap,
    }
    if cfg.prefs:
        result["preferences"] = preference_section(cfg, models)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "eval.md", render_markdown(result))
    predictions = []
    for i, (e, r) in enumerate(zip(examples, owners, strict=True)):
        row: dict[str, Any] = {"conversation": positions[e["record"]], "turn": e["turn"]}
        if r.turns == 1:
            row.update(instruction=r.instruction, input=r.input)
        else:  # the turn's own user message; the history is the record's
            row.update(instruction=e["prompt"][-1]["content"], input="")
        row.update(reference=references[i], category=categories[i], unseen=unseen[i])
        for role, rows in scored.items():
            s = rows[i]
            loss = s.loss.nll / s.loss.tokens if s.loss and s.loss.tokens else None
            row[role] = {
                "prediction": s.prediction,
                "rouge_l": s.rouge_l,
                "exact_match": s.exact_match,
                "log_loss": loss,
            }
        predictions.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(out / "predictions.jsonl", "".join(predictions))
    return {**result, "out": str(out)}


def _slices(
    scored: dict[str, list[_Scored]], categories: list[str], unseen: list[bool], known: bool, turns: list[int]
) -> dict[str, Any]:
    """Aggregates over all examples (answers), the seen and unseen categories (when the training corpus is
    known), each turn index (when there are conversations) and each category."""

    def summary(indices: list[int]) -> dict[str, Any]:
        per_role = {role: _aggregate([rows[i] for i in indices]) for role, rows in scored.items()}
        return {"examples": len(indices), **per_role}

    everything = list(range(len(categories)))
    overall = {"all": summary(everything)}
    if known:
        for name, flag in (("seen", False), ("unseen", True)):
            indices = [i for i in everything if unseen[i] is flag]
            if indices:
                overall[name] = summary(indices)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_category[c].append(i)
    by_turn: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(turns):
        by_turn[t].append(i)
    return {
        "overall": overall,
        "turns": {str(t): summary(idx) for t, idx in sorted(by_turn.items())} if len(by_turn) > 1 else {},
        "categories": {
            c: {"unseen": unseen[idx[0]], **summary(idx)} for c, idx in sorted(by_category.items())
        },
    }


def _fmt(value: float | None, scale: float, digits: int) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


_COLUMNS = [
    ("ROUGE-L", "rouge_l", 100, 1),
    ("EM", "exact_match", 100, 1),
    ("loss", "log_loss", 1, 3),
    ("ppl", "perplexity", 1, 2),
]


def markdown_table(result: dict[str, Any]) -> str:
    """One row per slice (all, seen, unseen, each category) with base and tuned side by side."""
    roles = [r for r in ("base", "tuned") if r in result["models"]]
    header = ["slice", "n"] + [f"{name} {role}" for name, *_ in _COLUMNS for role in roles]
    rows = list(result["overall"].items())
    rows += [(f"turn {t}", s) for t, s in result.get("turns", {}).items()]
    rows += [(f"{c} (unseen)" if s["unseen"] else c, s) for c, s in result["categories"].items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    for name, s in rows:
        cells = [name, str(s["examples"])]
        cells += [_fmt(s[role][key], scale, digits) for _, key, scale, digits in _COLUMNS for role in roles]
        lines.append("| " + " | ".join(cells) + " |")
    models = " · ".join(f"{role}: `{spec}`" for role, spec in result["models"].items())
    turns = (
        f" · n: answers scored, one per assistant turn of {result['records']} records; turn k: the k-th answers, "
        "each given the reference's earlier turns"
        if result.get("turns")
        else ""
    )
    return (
        "\n".join(lines)
        + f"\n\n{models} · template: {result['template']} · ROUGE-L F and exact match (classification tasks "
        f"only) ×100 · loss: mean NLL of the reference response, nats/token · ppl = exp(loss){turns}\n"
    )


# ---------------------------------------------------------------- preference accuracy


def preference_accuracy(
    model_path: str, pairs: list[dict[str, Any]], *, max_length: int = 2048, batch_size: int = 4
) -> dict[str, Any]:
    """How often the model finds the chosen answer more likely than the rejected one, on held-out pairs.

    `accuracy` compares the *summed* log-likelihoods of the two answers: DPO's implicit reward is β times the
    summed log-ratio to the reference, so this is what DPO training raises. `accuracy_per_token` compares the
    mean log-likelihood per token instead, which does not favour the shorter answer. A tie counts as wrong.
    `margin` is the mean of log p(chosen) - log p(rejected), in nats.
    """
    examples = [
        {"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen", "rejected")
    ]
    losses = response_losses(model_path, examples, max_length=max_length, batch_size=batch_size)
    chosen, rejected = losses[0::2], losses[1::2]
    n = len(pairs)
    return {
        "accuracy": sum(c.nll < r.nll for c, r in zip(chosen, rejected, strict=True)) / n,
        "accuracy_per_token": sum(
            c.nll / max(c.tokens, 1) < r.nll / max(r.tokens, 1) for c, r in zip(chosen, rejected, strict=True)
        )
        / n,
        "margin": sum(r.nll - c.nll for c, r in zip(chosen, rejected, strict=True)) / n,
    }


def preference_section(cfg: EvaluateConfig, models: list[_Model]) -> dict[str, Any]:
    """eval.json's `preferences`: preference accuracy of each model on `--prefs` (a seeded sample of
    --max-examples pairs when set)."""
    from selfinstruct.train import load_prefs

    _, pairs = load_prefs(str(cfg.prefs))
    if cfg.max_examples and cfg.max_examples < len(pairs):
        pairs = [
            pairs[i] for i in sorted(random.Random(cfg.seed).sample(range(len(pairs)), cfg.max_examples))
        ]
    section: dict[str, Any] = {"data": cfg.prefs, "pairs": len(pairs)}
    done: dict[str, dict[str, Any]] = {}
    for m in models:
        if m.path not in done:
            print(f"scoring {len(pairs)} preference pairs with {m.spec} ...", file=sys.stderr)
            done[m.path] = preference_accuracy(
                m.path, pairs, max_length=cfg.max_length, batch_size=cfg.loss_batch_size
            )
        section[m.role] = done[m.path]
    return section


def prefs_table(result: dict[str, Any]) -> str:
    """Preference accuracy, base and tuned side by side."""
    section = result["preferences"]
    roles = [r for r in ("base", "tuned") if r in section]
    lines = [
        "| preference pairs (n) | " + " | ".join(roles) + " |",
        "|---|" + "--:|" * len(roles),
    ]
    for label, key, scale, digits in (
        ("accuracy, summed log-lik.", "accuracy", 100, 1),
        ("accuracy, per-token log-lik.", "accuracy_per_token", 100, 1),
        ("margin (nats)", "margin", 1, 3),
    ):
        cells = [_fmt(section[r][key], scale, digits) for r in roles]
        lines.append(f"| {label} ({section['pairs']}) | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\naccuracy: share of held-out pairs whose chosen answer has the higher log-likelihood under the "
        "model (×100); summed over the answer's tokens as DPO's implicit reward, or averaged per token; margin: "
        "mean log p(chosen) − log p(rejected)\n"
    )


def render_markdown(result: dict[str, Any]) -> str:
    """eval.md: the held-out answers table (with --data) and the preference table (with --prefs)."""
    parts = [markdown_table(result)] if "overall" in result else []
    if "preferences" in result:
        parts.append(prefs_table(result))
    return "\n".join(parts)


def run_evaluate(cfg: EvaluateConfig) -> int:
    result = evaluate(cfg)
    print(render_markdown(result), end="")
    written = "eval.json, eval.md and predictions.jsonl" if "overall" in result else "eval.json and eval.md"
    print(f"wrote {written} to {result['out']}")
    return 0
