"""`selfinstruct stats`: the corpus statistics of the Self-Instruct paper and the run's own accounting.

For a run directory or a bare corpus file it computes counts (instructions, instances, classification tasks,
share with input), word-length histograms of instructions, inputs and outputs, the histogram of ROUGE-L F to
the most similar seed instruction (how far generation moved from the seeds), the most common root verbs with
their direct objects (the paper's diversity figure), and, for a run, rejection reasons, parse-failure rate,
tokens and cost. Everything goes to `stats.json`, PNG plots and one self-contained `report.html` (images
inlined as base64, no external resources), so the report can be mailed or attached to a dataset card.

Root verbs: with spaCy and its `en_core_web_sm` model installed, the dependency parse's root verb and its
direct object are used. Otherwise a documented heuristic (`verb_object`): the first clause that starts with
a verb from a lexicon of instruction verbs gives the verb, and the last word of the noun phrase after it
(skipping pronouns, determiners and a few adjectives, stopping at a preposition or conjunction) its object.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import Field

from selfinstruct.config import Section, load_toml
from selfinstruct.corpus import is_seed_format, load_corpus_any, load_seed_tasks, load_tasks_any, read_rows
from selfinstruct.errors import UserError
from selfinstruct.evaluate import task_of
from selfinstruct.filters.heuristics import FilterConfig
from selfinstruct.prompts import read_template
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import CONFIG
from selfinstruct.store import atomic_write_json, atomic_write_text, read_jsonl


class StatsConfig(Section):
    """The `[stats]` table and the `selfinstruct stats` flags."""

    path: str | None = Field(
        None,
        description="a run directory, or a corpus file (Alpaca JSON/JSONL, seed JSONL, chat JSONL, Parquet)",
        json_schema_extra={"positional": True},
    )
    out: str | None = Field(None, description="report directory (default: RUN/report, or CORPUS_report)")
    seeds: str | None = Field(
        None,
        description="seed tasks for the ROUGE-L-to-seeds histogram of the machine-written instructions, or of "
        "every instruction when none is marked machine-written (default: the run's seed file)",
    )
    top_verbs: int = Field(20, gt=0, description="root verbs shown (each with its 4 most common objects)")
    parser: Literal["auto", "spacy", "heuristic"] = Field(
        "auto",
        description="root-verb extraction: spaCy's en_core_web_sm when installed (auto), or the heuristic",
    )
    examples: int = Field(5, ge=0, description="random records shown in the report")
    seed: int = Field(0, description="seed for choosing the shown records")
    tokenizer: str | None = Field(
        None,
        description="count conversation turns in this model's tokens (a directory, hub id or built-in name; "
        "default: whitespace-separated words)",
    )


# ---------------------------------------------------------------- reading a run or a corpus


@dataclass
class Instruction:
    text: str
    is_classification: bool | None
    origin: str  # "machine" or "seed"


@dataclass
class Source:
    """What the statistics are computed from; run-only parts are None for a bare corpus."""

    path: Path
    is_run: bool
    instructions: list[Instruction]
    instances: list[CorpusRecord]
    rejected: list[dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None
    seeds: str | None = None  # the seed file the run was generated from
    threshold: float = FilterConfig().threshold  # the run's novelty threshold ([filters] threshold)
    notes: list[str] = field(default_factory=list)


def _from_corpus(records: list[CorpusRecord]) -> list[Instruction]:
    """One instruction per task (meta.task_id, else the instruction text), in first-seen order."""
    seen: dict[str, Instruction] = {}
    for r in records:
        key = task_of(r)
        if key not in seen:
            seen[key] = Instruction(
                r.instruction, r.meta.get("is_classification"), r.meta.get("origin", "machine")
            )
    return list(seen.values())


def _load_file(path: Path) -> tuple[list[Instruction], list[CorpusRecord]]:
    path, rows = read_rows(path)
    if is_seed_format(rows[0][1]):
        tasks = load_seed_tasks(path)
        instructions = [Instruction(t.instruction, t.is_classification, "seed") for t in tasks]
        instances = [
            CorpusRecord(t.instruction, i.input, i.output, {"task_id": t.id, "category": t.category})
            for t in tasks
            for i in t.instances
        ]
        return instructions, instances
    records = load_corpus_any(path, rows)
    return _from_corpus(records), records


def _run_settings(run: Path) -> tuple[str | None, float]:
    """The seed file ([generate] seeds) and the novelty threshold ([filters] threshold) of a run's config."""
    config = run / CONFIG
    data = load_toml(config) if config.is_file() else {}
    seeds = data.get("generate", {}).get("seeds")
    threshold = data.get("filters", {}).get("threshold", FilterConfig().threshold)
    return (seeds if isinstance(seeds, str) and seeds else None), float(threshold)


def load_source(path: str) -> Source:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such run directory or corpus file")
    p = p.resolve()
    if not p.is_dir():
        instructions, instances = _load_file(p)
        return Source(p, False, instructions, instances)
    corpus, kept = p / "corpus.jsonl", p / "instructions.jsonl"
    if not corpus.is_file() and not kept.is_file() and (p / "selected.jsonl").is_file():  # a `select` output
        instructions, instances = _load_file(p / "selected.jsonl")
        return Source(p, False, instructions, instances)
    if not corpus.is_file() and not kept.is_file():
        raise UserError(f"{p}: not a run directory (no corpus.jsonl or instructions.jsonl)")
    seeds, threshold = _run_settings(p)
    rejected = list(read_jsonl(p / "rejected.jsonl"))
    source = Source(p, True, [], [], rejected=rejected, seeds=seeds, threshold=threshold)
    if (p / "summary.json").is_file():
        source.summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
    if corpus.is_file() and corpus.stat().st_size:
        source.instances = load_corpus_any(corpus)
        source.instructions = _from_corpus(source.instances)
    else:  # a run still generating: its kept instructions and whatever instances they have so far
        source.notes.append("corpus.jsonl not written yet: statistics of instructions.jsonl")
        for rec in read_jsonl(kept):
            source.instructions.append(
                Instruction(rec["instruction"], rec.get("is_classification"), "machine")
            )
            for inst in rec.get("instances") or []:
                source.instances.append(
                    CorpusRecord(rec["instruction"], inst.get("input", ""), inst.get("output", ""))
                )
    return source


# ---------------------------------------------------------------- statistics


def words(text: str) -> int:
    return len(text.split())


def length_stats(values: list[int]) -> dict[str, Any]:
    """Summary and an integer-bin histogram (at most ~40 bins) of word counts."""
    if not values:
        return {"count": 0}
    top = max(values)
    width = max(1, math.ceil((top + 1) / 40))
    counts = Counter(v // width for v in values)
    edges = list(range(0, (top // width + 2) * width, width))
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        "max": top,
        "histogram": {"edges": edges, "counts": [counts.get(i, 0) for i in range(len(edges) - 1)]},
    }


def rouge_to_seeds(instructions: list[str], seeds: list[str]) -> list[float]:
    """For each instruction, the ROUGE-L F to its most similar seed instruction (exact, rouge-score
    semantics; the novelty filter's index with top-1 search)."""
    from selfinstruct.filters.rouge import NoveltyIndex

    index = NoveltyIndex.from_texts(seeds, top_k=1)
    return [r.max_f for r in index.query(instructions, add_kept=False)]


def rouge_histogram(scores: list[float], bins: int = 20) -> dict[str, Any]:
    counts = [0] * bins
    for s in scores:
        counts[min(int(s * bins), bins - 1)] += 1
    return {"edges": [i / bins for i in range(bins + 1)], "counts": counts}


# Verbs that start instructions ("Write ...", "Classify ..."): the heuristic's lexicon.
VERBS = frozenset(
    """
    act add analyze analyse answer arrange ask assess assign brainstorm build calculate categorize change check
    choose cite classify combine come compare compile complete compose compute condense construct convert
    correct count create critique decide define demonstrate describe design detect determine develop devise
    discuss draft edit elaborate estimate evaluate expand explain express extract fill find fix format formulate
    generate give group guess help highlight identify illustrate imagine implement improve infer interpret
    invent judge label list make match measure merge mention name order organize outline paraphrase pick plan
    predict prepare present pretend produce proofread propose prove provide rank rate read recommend reformulate
    remove rephrase replace reply report respond restate retell reverse review revise rewrite reword say score
    select separate share shorten show simplify solve sort specify split state suggest summarize summarise
    support tag teach tell test think transform translate turn use verify write
    """.split()
)
_LEADING = re.compile(
    r"^(?:please|kindly|now|also|then|next|briefly|quickly|carefully|simply|"
    r"(?:can|could|would|will) you(?: please)?|i (?:want|need) you to|you (?:should|must|need to)|"
    r"your task is to)\s+"
)
_PRONOUNS = frozenset("me us him her them you it this that these those something someone".split())
# Skipped before the object's phrase starts: determiners, numbers, common adjectives and verb particles.
_SKIP = frozenset(
    """
    a an the some any each every all few several many more most one two three four five six seven eight nine ten
    my your his its our their following given new short brief simple detailed good creative different random
    possible other another single same main best first last up out down off with
    """.split()
)
# End the object's phrase: prepositions, conjunctions, wh-words and auxiliaries.
_STOP = frozenset(
    """
    of for to in on at by with about from into as that which who whom whose where when while if and or but so
    than using based according between without within over under after before like why how what whether
    is are was were be been can could should would will shall may might must do does did has have had not
    """.split()
)


def verb_object(instruction: str) -> tuple[str | None, str | None]:
    """The heuristic root verb and direct object of an imperative instruction (lowercased), or None.

    The verb is the first word of the first clause that starts with a lexicon verb (after "please", "can you",
    ...); the object is the last word of the (at most 4-word) phrase that follows it.
    """
    for clause in re.split(r"[.,;:!?\n]+", instruction.lower()):
        tokens = re.findall(r"[a-z]+(?:'[a-z]+)?", _LEADING.sub("", clause.strip()))
        if not tokens or tokens[0] not in VERBS:
            continue
        phrase: list[str] = []
        for token in tokens[1:]:
            if not phrase and (token in _PRONOUNS or token in _SKIP):
                continue
            if token in _STOP or token in _PRONOUNS:
                break
            phrase.append(token)
            if len(phrase) == 4:
                break
        return tokens[0], phrase[-1] if phrase else None
    return None, None


def _spacy_nlp(parser: str) -> Any:
    """spaCy's small English pipeline if installed; None selects the heuristic."""
    if parser == "heuristic":
        return None
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["ner"])
    except (ImportError, OSError):
        if parser == "spacy":
            raise UserError("--parser spacy needs spaCy and its en_core_web_sm model installed") from None
        return None


def verbs_and_objects(instructions: list[str], parser: str, top: int) -> dict[str, Any]:
    nlp = _spacy_nlp(parser)
    pairs: list[tuple[str | None, str | None]]
    if nlp is None:
        pairs = [verb_object(t) for t in instructions]
    else:
        pairs = []
        for doc in nlp.pipe(instructions):
            root = next((t for t in doc if t.dep_ == "ROOT"), None)
            if root is None or root.pos_ != "VERB":
                pairs.append((None, None))
                continue
            obj = next((c for c in root.children if c.dep_ in ("dobj", "obj")), None)
            pairs.append((root.lemma_.lower(), obj.lemma_.lower() if obj is not None else None))
    verbs = Counter(v for v, _ in pairs if v)
    objects: dict[str, Counter[str]] = {}
    for v, o in pairs:
        if v and o:
            objects.setdefault(v, Counter())[o] += 1
    return {
        "parser": "spacy:en_core_web_sm" if nlp is not None else "heuristic",
        "instructions": len(instructions),
        "with_verb": sum(1 for v, _ in pairs if v),
        "with_verb_object": sum(1 for v, o in pairs if v and o),
        "distinct_verbs": len(verbs),
        "top": [
            {
                "verb": v,
                "count": n,
                "objects": [{"object": o, "count": k} for o, k in objects.get(v, Counter()).most_common(4)],
            }
            for v, n in verbs.most_common(top)
        ],
    }


def _rejections(source: Source) -> dict[str, Any]:
    if not source.is_run:
        return {"available": False, "reason": "not a run directory"}
    by_reason = Counter(str(r.get("reason", "unknown")) for r in source.rejected or [])
    by_stage = Counter(str(r.get("stage", "unknown")) for r in source.rejected or [])
    if not by_reason and source.summary and source.summary.get("rejected_by_reason"):
        by_reason = Counter(source.summary["rejected_by_reason"])
    return {
        "available": True,
        "total": sum(by_reason.values()),
        "by_reason": dict(by_reason.most_common()),
        "by_stage": dict(by_stage.most_common()),
    }


def _generation(source: Source) -> dict[str, Any]:
    """Teacher accounting from summary.json. The parse-failure rate is unparseable items over all items
    (parsed candidates + parse failures); keep rate is kept instructions over candidates."""
    if not source.is_run:
        return {"available": False, "reason": "not a run directory"}
    s = source.summary
    if not s:
        return {"available": False, "reason": "the run has no summary.json"}
    keys = (
        "pipeline", "teacher_model", "target", "kept", "candidates", "parse_failures", "requests",
        "failed_requests", "retries", "prompt_tokens", "completion_tokens", "cost", "elapsed_s", "finished",
    )  # fmt: skip
    out: dict[str, Any] = {"available": True, **{k: s.get(k) for k in keys}}
    candidates, failures, kept = s.get("candidates") or 0, s.get("parse_failures") or 0, s.get("kept") or 0
    out["parse_failure_rate"] = failures / (candidates + failures) if candidates + failures else None
    out["keep_rate"] = kept / candidates if candidates else None
    tokens = (s.get("prompt_tokens") or 0) + (s.get("completion_tokens") or 0)
    out["total_tokens"] = tokens
    out["tokens_per_kept"] = tokens / kept if kept else None
    out["cost_per_1k_kept"] = 1000 * s["cost"] / kept if kept and s.get("cost") is not None else None
    return out


def _evolution(source: Source, parser: str) -> dict[str, Any]:
    """An evolve run (`selfinstruct evolve`): attempts and survivors per round and operation (evolved.jsonl +
    rejected.jsonl), and how the corpus changes with depth: instruction length, root-verb diversity, answer length
    (corpus.jsonl; originals are depth 0)."""
    evolved = source.path / "evolved.jsonl"
    if not source.is_run or not evolved.is_file():
        return {"available": False, "reason": "not an evolve run"}
    attempts: Counter[tuple[int, str]] = Counter()
    survived: Counter[tuple[int, str]] = Counter()
    rejected: dict[int, Counter[str]] = {}
    for rec in read_jsonl(evolved):
        evol = rec["meta"]["evol"]
        attempts[(evol["round"], evol["op"])] += 1
        survived[(evol["round"], evol["op"])] += 1
    for rec in source.rejected or []:
        evol = (rec.get("meta") or {}).get("evol")
        if evol:
            attempts[(evol["round"], evol["op"])] += 1
            rejected.setdefault(evol["round"], Counter())[str(rec.get("reason"))] += 1
    rounds: dict[str, Any] = {}
    by_op: dict[str, dict[str, Any]] = {}
    for (round_, op), n in sorted(attempts.items()):
        r = rounds.setdefault(str(round_), {"attempts": 0, "survived": 0, "by_op": {}})
        r["attempts"] += n
        r["survived"] += survived[(round_, op)]
        r["by_op"][op] = {"attempts": n, "survived": survived[(round_, op)]}
        r["rejected_by_reason"] = dict(rejected.get(round_, Counter()).most_common())
        total = by_op.setdefault(op, {"attempts": 0, "survived": 0})
        total["attempts"] += n
        total["survived"] += survived[(round_, op)]
    for total in by_op.values():
        total["survival_rate"] = total["survived"] / total["attempts"]
    groups: dict[int, list[CorpusRecord]] = {}
    for r in source.instances:
        groups.setdefault(int((r.meta.get("evol") or {}).get("depth", 0)), []).append(r)
    by_depth = []
    for depth, records in sorted(groups.items()):
        verbs = verbs_and_objects([r.instruction for r in records], parser, 5)
        by_depth.append(
            {
                "depth": depth,
                "records": len(records),
                "instruction_words": length_stats([words(r.instruction + " " + r.input) for r in records]),
                "answer_words": length_stats([words(r.output) for r in records]),
                "distinct_verbs": verbs["distinct_verbs"],
                "share_with_verb": verbs["with_verb"] / len(records),
            }
        )
    for d in by_depth:  # the histograms are per-depth noise in stats.json; keep the summary numbers
        for key in ("instruction_words", "answer_words"):
            d[key].pop("histogram", None)
    return {"available": True, "rounds": rounds, "by_op": by_op, "by_depth": by_depth}


def conversation_stats(records: list[CorpusRecord], count: Callable[[str], int], unit: str) -> dict[str, Any]:
    """Turns per conversation and the length of each user and assistant turn, over the chat records."""
    chats = [r.messages for r in records if r.messages is not None]
    if not chats:
        return {"available": False, "reason": "no chat records"}
    turns = [m for messages in chats for m in messages]
    return {
        "available": True,
        "unit": unit,
        "conversations": len(chats),
        "multi_turn": sum(1 for r in records if r.turns > 1),
        "with_system": sum(1 for messages in chats if messages[0]["role"] == "system"),
        "turns_per_conversation": length_stats([sum(m["role"] == "assistant" for m in c) for c in chats]),
        "user_turn": length_stats([count(m["content"]) for m in turns if m["role"] == "user"]),
        "assistant_turn": length_stats([count(m["content"]) for m in turns if m["role"] == "assistant"]),
    }


def _counter(tokenizer: str | None) -> tuple[Callable[[str], int], str]:
    """How turn lengths are counted: the model's tokens (`--tokenizer`), else words."""
    if tokenizer is None:
        return words, "words"
    from selfinstruct.magpie import load_tokenizer

    tok = load_tokenizer(tokenizer, "--tokenizer", needs_chat_template=False)
    return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), f"{tokenizer} tokens"


def compute_stats(
    source: Source, seeds_path: str | None, parser: str, top_verbs: int, tokenizer: str | None = None
) -> dict[str, Any]:
    instructions, instances = source.instructions, source.instances
    with_input = sum(1 for r in instances if r.input.strip())
    classification = sum(1 for i in instructions if i.is_classification)
    counts = {
        "instructions": len(instructions),
        "machine_instructions": sum(1 for i in instructions if i.origin != "seed"),
        "seed_instructions": sum(1 for i in instructions if i.origin == "seed"),
        "classification_instructions": classification,
        "non_classification_instructions": sum(1 for i in instructions if i.is_classification is False),
        "unknown_classification": sum(1 for i in instructions if i.is_classification is None),
        "instances": len(instances),
        "instances_with_input": with_input,
        "share_with_input": with_input / len(instances) if instances else None,
        "instances_per_instruction": len(instances) / len(instructions) if instructions else None,
    }
    lengths = {
        "instruction": length_stats([words(i.text) for i in instructions]),
        "input": length_stats([words(r.input) for r in instances if r.input.strip()]),
        "output": length_stats([words(r.output) for r in instances]),
    }
    novelty: dict[str, Any]
    explicit_seeds = seeds_path is not None
    seeds_path = seeds_path or source.seeds
    if not seeds_path:
        novelty = {"available": False, "reason": "no seed file (pass --seeds)"}
    elif not Path(seeds_path).expanduser().is_file():
        novelty = {"available": False, "reason": f"seed file {seeds_path} not found"}
    else:
        seeds = [t.instruction for t in load_tasks_any(Path(seeds_path).expanduser())]
        # The machine-written instructions; a corpus with none marked as such (a seed-format file, a split of
        # seeds) is scored whole against seeds given with --seeds.
        machine = [i.text for i in instructions if i.origin != "seed"]
        scored = machine or ([i.text for i in instructions] if explicit_seeds else [])
        scores = rouge_to_seeds(scored, seeds) if scored else []
        novelty = {
            "available": bool(scores),
            "seeds": seeds_path,
            "seed_instructions": len(seeds),
            "scored_instructions": len(scores),
            "threshold": source.threshold,
        }
        if scores:
            novelty.update(
                mean=statistics.fmean(scores),
                median=statistics.median(scores),
                share_above_threshold=sum(1 for f in scores if f > source.threshold) / len(scores),
                histogram=rouge_histogram(scores),
            )
        else:
            novelty["reason"] = "no machine-generated instructions"
    return {
        "source": {
            "path": str(source.path),
            "kind": "run" if source.is_run else "corpus",
            "notes": source.notes,
        },
        "counts": counts,
        "lengths": lengths,
        "conversations": conversation_stats(instances, *_counter(tokenizer)),
        "rouge_to_seeds": novelty,
        "verbs": verbs_and_objects([i.text for i in instructions], parser, top_verbs),
        "rejections": _rejections(source),
        "generation": _generation(source),
        "evolution": _evolution(source, parser),
    }


# ---------------------------------------------------------------- plots


def _plots(stats: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the PNG figures; returns name -> path for those that have data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    written: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path

    lengths = stats["lengths"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (name, color) in zip(
        axes, (("instruction", "#4C72B0"), ("input", "#55A868"), ("output", "#C44E52")), strict=True
    ):
        s = lengths[name]
        ax.set_title(f"{name} length (words)")
        if not s["count"]:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            continue
        h = s["histogram"]
        ax.bar(h["edges"][:-1], h["counts"], width=h["edges"][1] - h["edges"][0], align="edge", color=color)
        ax.axvline(s["median"], color="black", lw=1, ls="--", label=f"median {s['median']:g}")
        ax.set_ylabel("count")
        ax.legend(frameon=False)
    save(fig, "lengths")

    novelty = stats["rouge_to_seeds"]
    if novelty.get("histogram"):
        h = novelty["histogram"]
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        ax.bar(
            h["edges"][:-1], h["counts"], width=h["edges"][1] - h["edges"][0], align="edge", color="#8172B2"
        )
        threshold = novelty["threshold"]
        ax.axvline(threshold, color="black", lw=1, ls="--", label=f"filter threshold {threshold:g}")
        ax.set_xlabel("ROUGE-L F to the most similar seed instruction")
        ax.set_ylabel("instructions")
        ax.set_xlim(0, 1)
        ax.legend(frameon=False)
        save(fig, "rouge_to_seeds")

    top = stats["verbs"]["top"]
    if top:
        save(_verb_donut(plt, top), "verbs")

    selection = stats.get("selection") or {}
    if selection.get("available"):
        save(_selection_plot(plt, selection), "selection")

    reasons = stats["rejections"].get("by_reason") or {}
    if reasons:
        items = list(reasons.items())[:15][::-1]
        fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.3 * len(items)))
        ax.barh([k for k, _ in items], [v for _, v in items], color="#DD8452")
        ax.set_xlabel("rejected candidates")
        for y, (_, v) in enumerate(items):
            ax.text(v, y, f" {v}", va="center")
        save(fig, "rejections")

    evolution = stats.get("evolution") or {}
    if evolution.get("available") and evolution["by_depth"]:
        depths = [d["depth"] for d in evolution["by_depth"]]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        ops = list(evolution["by_op"].items())
        axes[0].bar([op for op, _ in ops], [100 * o["survival_rate"] for _, o in ops], color="#4C72B0")
        axes[0].set_title("survival rate per operation (%)")
        axes[0].tick_params(axis="x", rotation=30)
        lines = (
            ("instruction_words", "#4C72B0", "instruction + input"),
            ("answer_words", "#C44E52", "answer"),
        )
        for key, color, label in lines:
            axes[1].plot(
                depths, [d[key].get("mean", 0) for d in evolution["by_depth"]], "o-", color=color, label=label
            )
        axes[1].set_title("mean length (words) by depth")
        axes[1].legend(frameon=False)
        bars = axes[2].bar(depths, [d["distinct_verbs"] for d in evolution["by_depth"]], color="#55A868")
        axes[2].bar_label(bars, labels=[f"of {d['records']}" for d in evolution["by_depth"]])
        axes[2].set_title("distinct root verbs by depth (of n records)")
        for ax in axes[1:]:
            ax.set_xlabel("depth (0 = original)")
            ax.set_xticks(depths)
        save(fig, "evolution")
    return written


def selection_section(path: Path) -> dict[str, Any]:
    """Scores of selected vs other records when `path` is (or sits in) a `selfinstruct select` output."""
    from selfinstruct.select import selection_stats

    found = selection_stats(path)
    if found is None:
        return {"available": False, "reason": "not a select output (no select_report.json and scores.jsonl)"}
    return {"available": True, **found}


def _selection_plot(plt: Any, selection: dict[str, Any]) -> Any:
    """One histogram per scorer: selected records over the others, on shared bins."""
    scorers = selection["scorers"]
    fig, axes = plt.subplots(1, len(scorers), figsize=(4.2 * len(scorers), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], scorers.items(), strict=True):
        both = values["selected"] + values["other"]
        ax.set_title(f"{name} score")
        if not both:
            continue
        lo, hi = min(both), max(both)
        bins = [lo + (hi - lo) * k / 20 for k in range(21)] if hi > lo else 1
        ax.hist(values["other"], bins=bins, color="#BBBBBB", label=f"not selected ({len(values['other'])})")
        ax.hist(
            values["selected"],
            bins=bins,
            color="#4C72B0",
            alpha=0.85,
            label=f"selected ({len(values['selected'])})",
        )
        if name == "ifd":
            ax.axvline(1.0, color="black", lw=1, ls="--", label="IFD 1 (never selected at or above)")
        ax.set_ylabel("records")
        ax.legend(frameon=False)
    return fig


def _verb_donut(plt: Any, top: list[dict[str, Any]]) -> Any:
    """The paper's sunburst as two rings: root verbs inside, each verb's top objects outside."""
    cmap = plt.get_cmap("tab20")
    inner = [v["count"] for v in top]
    outer, outer_labels, outer_colors = [], [], []
    for k, v in enumerate(top):
        base = cmap(k % 20)
        rest = v["count"]
        for o in v["objects"]:
            outer.append(o["count"])
            outer_labels.append(o["object"])
            outer_colors.append((*base[:3], 0.75))
            rest -= o["count"]
        if rest > 0:
            outer.append(rest)
            outer_labels.append("")
            outer_colors.append((*base[:3], 0.25))
    total = sum(inner)
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.pie(
        inner,
        radius=0.7,
        labels=[v["verb"] if v["count"] / total > 0.015 else "" for v in top],
        labeldistance=0.55,
        colors=[cmap(k % 20) for k in range(len(top))],
        wedgeprops={"width": 0.4, "edgecolor": "white"},
        textprops={"fontsize": 8, "ha": "center"},
        startangle=90,
        counterclock=False,
    )
    ax.pie(
        outer,
        radius=1.0,
        labels=[lab if n / total > 0.01 else "" for lab, n in zip(outer_labels, outer, strict=True)],
        labeldistance=0.86,
        colors=outer_colors,
        wedgeprops={"width": 0.3, "edgecolor": "white"},
        textprops={"fontsize": 7, "ha": "center"},
        rotatelabels=True,
        startangle=90,
        counterclock=False,
    )
    ax.set_title("root verbs (inner) and their most common direct objects (outer)")
    return fig


# ---------------------------------------------------------------- HTML


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(stats: dict[str, Any], images: dict[str, Path], examples: list[CorpusRecord]) -> str:
    """The self-contained page: the layout lives in the `report.html` template (Jinja2, autoescaped), plots are
    embedded as data: URIs so the file can be mailed or archived alone."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(num=_num, pct=_pct, mean=_mean)
    template = env.from_string(read_template("report.html"))
    return template.render(
        title=f"Corpus report: {Path(stats['source']['path']).name}",
        stats=stats,
        images={name: _data_uri(path) for name, path in images.items() if path is not None},
        examples=examples,
    )


# ---------------------------------------------------------------- command


def stats_report(cfg: StatsConfig) -> tuple[dict[str, Any], Path]:
    """Compute the statistics and write stats.json, the PNG plots and report.html; returns (stats, out dir)."""
    if not cfg.path:
        raise UserError("stats needs a RUN directory or CORPUS file")
    source = load_source(cfg.path)
    if not source.instructions:
        raise UserError(f"{source.path}: no instructions to describe")
    default_out = (
        source.path / "report" if source.is_run else source.path.with_name(source.path.stem + "_report")
    )
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    stats = compute_stats(source, cfg.seeds, cfg.parser, cfg.top_verbs, cfg.tokenizer)
    stats["selection"] = selection_section(source.path)
    images = _plots(stats, out)
    stats["plots"] = {name: path.name for name, path in images.items()}
    rng = random.Random(cfg.seed)
    shown = rng.sample(source.instances, min(cfg.examples, len(source.instances)))
    atomic_write_json(out / "stats.json", stats)
    atomic_write_text(out / "report.html", render_html(stats, images, shown))
    return stats, out


def run_stats(cfg: StatsConfig) -> int:
    stats, out = stats_report(cfg)
    c = stats["counts"]
    print(
        f"{c['instructions']:,} instructions ({c['classification_instructions']:,} classification), "
        f"{c['instances']:,} instances, {_pct(c['share_with_input'])} with input"
    )
    chats = stats["conversations"]
    if chats["available"]:
        per = chats["turns_per_conversation"]
        print(
            f"{chats['conversations']:,} conversations: {per['mean']:.2f} turns on average (max {per['max']}), "
            f"{chats['user_turn']['mean']:.1f} / {chats['assistant_turn']['mean']:.1f} {chats['unit']} per "
            "user / assistant turn"
        )
    novelty = stats["rouge_to_seeds"]
    if novelty.get("available"):
        print(f"ROUGE-L to the nearest seed: mean {novelty['mean']:.3f}, median {novelty['median']:.3f}")
    top = ", ".join(v["verb"] for v in stats["verbs"]["top"][:8])
    print(f"top root verbs ({stats['verbs']['parser']}): {top or 'none found'}")
    if stats["rejections"]["available"]:
        print(f"rejected candidates: {stats['rejections']['total']:,}")
    evolution = stats["evolution"]
    if evolution["available"]:
        rates = ", ".join(f"{op} {_pct(o['survival_rate'])}" for op, o in evolution["by_op"].items())
        print(f"evolution: survival by operation: {rates or 'no attempts yet'}")
    print(f"report: {out / 'report.html'} (stats.json and PNG plots beside it)")
    return 0
