"""A labelled near-duplicate fixture for dedup: distinct tasks, plus rewritten copies of some of them.

Base records come from the fake teacher's grammar (`responders`), so many of them are hard negatives: siblings of
one template that differ only in topic, audience or number ("Explain glaciers to a tourist in two sentences" vs
"Explain jazz to a tourist in two sentences") are different tasks and must both stay. Each copy is one of five
kinds of rewrite a teacher or a merged dataset produces:

* `format`: case, spacing and punctuation changed (exact duplicates after normalisation);
* `synonyms`: one to three words swapped for synonyms;
* `framing`: a polite request wrapper added ("Could you …", "… Thanks!");
* `reorder`: a trailing clause or the "for AUDIENCE" phrase moved to the front;
* `paraphrase`: synonyms and a framing wrapper together (the hardest).

`score_clusters` turns a dedup result into recall and precision: a removed record is a true positive when the
record it was matched to belongs to its own group.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfinstruct.dedup import normalize
from selfinstruct.testing.responders import PipelineResponder

KINDS = ("format", "synonyms", "framing", "reorder", "paraphrase")

SYNONYMS = {
    "write": "compose",
    "draft": "prepare",
    "compose": "write",
    "create": "make",
    "explain": "describe",
    "describe": "explain",
    "summarize": "condense",
    "suggest": "recommend",
    "list": "name",
    "give": "provide",
    "short": "brief",
    "tips": "pieces of advice",
    "surprising": "unexpected",
    "main": "key",
    "article": "text",
    "review": "critique",
    "statement": "claim",
    "compare": "contrast",
    "following": "given",
    "about": "on",
    "facts": "details",
    "plan": "organize",
    "design": "devise",
    "sentences": "lines",
    "paragraph": "passage",
    "question": "query",
    "names": "name ideas",
    "startup": "new company",
    "benefits": "advantages",
    "risk": "danger",
}
OPENERS = ["Could you ", "Please ", "I need you to ", "Can you please ", "Your task: "]
CLOSERS = [" Thanks!", " Thank you.", " Please be careful.", " I appreciate it."]
_CLAUSE = re.compile(r"^(.*?[.?!])\s+([A-Z][^.?!]*[.?!])$")
_FOR = re.compile(r"^(.*?) for ((?:a|an|first-year|the) [^.?!]+?)([.?!])$")


@dataclass
class FixtureRecord:
    record: dict[str, str]
    group: int  # records of one group are the same task
    kind: str  # "base" or one of KINDS


def _format(text: str, rng: random.Random) -> str:
    text = text.upper() if rng.random() < 0.3 else text.lower()
    text = text.replace(" ", "  ", 2).rstrip(".?!")
    return "  " + text + rng.choice(["!!", " ?", "", " ."])


def _synonyms(text: str, rng: random.Random, k: int) -> str:
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if re.sub(r"\W", "", w).lower() in SYNONYMS]
    for i in rng.sample(spots, min(k, len(spots))):
        core = re.sub(r"\W", "", words[i])
        repl = SYNONYMS[core.lower()]
        repl = repl.capitalize() if core[:1].isupper() else repl
        words[i] = words[i].replace(core, repl)
    return " ".join(words)


def _framing(text: str, rng: random.Random) -> str:
    body = text[0].lower() + text[1:] if text[:2] != "I " else text
    return rng.choice(OPENERS) + body + rng.choice(CLOSERS)


def _reorder(text: str, rng: random.Random) -> str:
    m = _CLAUSE.match(text)
    if m:
        return f"{m.group(2)} {m.group(1)}"
    m = _FOR.match(text)
    if m:
        return f"For {m.group(2)}, {m.group(1)[0].lower()}{m.group(1)[1:]}{m.group(3)}"
    return _framing(text, rng)


def rewrite(text: str, kind: str, rng: random.Random) -> str:
    if kind == "format":
        return _format(text, rng)
    if kind == "synonyms":
        return _synonyms(text, rng, rng.randint(1, 3))
    if kind == "framing":
        return _framing(text, rng)
    if kind == "reorder":
        return _reorder(text, rng)
    return _framing(_synonyms(text, rng, rng.randint(2, 3)), rng)


def build_fixture(bases: int = 1000, copies: int = 1000, seed: int = 0) -> list[FixtureRecord]:
    """`bases` distinct tasks and `copies` rewrites of randomly chosen ones (kinds in equal shares), shuffled."""
    rng = random.Random(seed)
    responder = PipelineResponder(seed)
    records: list[FixtureRecord] = []
    seen: set[str] = set()
    while len(records) < bases:
        task = responder._task(rng)
        key = normalize(task["instruction"] + "\n" + task["input"])
        if key not in seen:
            seen.add(key)
            records.append(FixtureRecord(task, len(records), "base"))
    for k in range(copies):
        base = records[rng.randrange(bases)]
        kind = KINDS[k % len(KINDS)]
        rec = dict(base.record)
        rec["instruction"] = rewrite(rec["instruction"], kind, rng)
        if rec["input"] and kind == "format":
            rec["input"] = _format(rec["input"], rng)
        records.append(FixtureRecord(rec, base.group, kind))
    rng.shuffle(records)
    return records


def score_clusters(fixture: Sequence[FixtureRecord], nearest: Sequence[int | None]) -> dict[str, Any]:
    """Recall and precision of a dedup result, overall and per rewrite kind.

    `nearest[i]` is the index of the record that record i was judged a duplicate of (None: kept). Recall counts
    every record beyond the first of its group as one that should go.
    """
    sizes: dict[int, int] = {}
    for r in fixture:
        sizes[r.group] = sizes.get(r.group, 0) + 1
    should = sum(n - 1 for n in sizes.values())
    removed = [i for i, j in enumerate(nearest) if j is not None]
    correct = [i for i in removed if fixture[nearest[i]].group == fixture[i].group]  # type: ignore[index]
    by_kind: dict[str, dict[str, int]] = {k: {"copies": 0, "caught": 0} for k in KINDS}
    for r in fixture:
        if r.kind != "base":
            by_kind[r.kind]["copies"] += 1
    # A copy is caught when its group ends with exactly one kept record: attribute per removed record's kind,
    # or, when the base itself was removed (a copy came first), to the copy that was kept in its place.
    for i in correct:
        kind = fixture[i].kind if fixture[i].kind != "base" else fixture[nearest[i]].kind  # type: ignore[index]
        if kind in by_kind:
            by_kind[kind]["caught"] += 1
    return {
        "records": len(fixture),
        "should_remove": should,
        "removed": len(removed),
        "correct": len(correct),
        "recall": len(correct) / should if should else 1.0,
        "precision": len(correct) / len(removed) if removed else 1.0,
        "by_kind": {k: v["caught"] / v["copies"] if v["copies"] else None for k, v in by_kind.items()},
    }
