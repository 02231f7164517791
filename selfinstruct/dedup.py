"""`selfinstruct dedup CORPUS --out DIR`: drop exact, near and semantic duplicates, and decontaminate.

ROUGE-L novelty (`filter`) compares instructions word by word in order; this command catches what it misses:
the same task with a reworded input, a reordered sentence, or a paraphrase. Three methods, all run over the
text of `--fields` (joined by newlines; a conversation's fields cover all its turns, `CorpusRecord.text_of`):

* `exact`: identical after normalisation (Unicode NFKC, lowercase, every run of non-word characters one space).
* `minhash`: Jaccard similarity of the texts' shingle sets (character or word n-grams of the normalised text)
  at least `--threshold` (default 0.6). `datasketch`'s MinHash-LSH finds the candidate pairs (`--num-perm`
  permutations; its band layout is tuned to the threshold), and each candidate's exact Jaccard decides, so
  LSH only costs recall on borderline pairs, never precision.
* `semantic`: cosine similarity of sentence vectors at least `--threshold` (default 0.9 for neural encoders,
  0.7 for the hashed fallback); the encoder comes from `--encoder` (see `selfinstruct.embed`).

Records are judged in file order against the records kept so far, so the first of a group stays and every later
near-copy points at it (star clusters around kept records: no chains of pairwise-similar records drifting away
from what was kept). With `--against EVAL` every record is first checked against the evaluation set with the
same method and threshold and dropped if it near-duplicates one (decontamination); evaluation records never
join the kept pool.

Outputs in `--out`: `kept.jsonl` (records unchanged, readable by `train`, `export`, `select`, `stats`),
`clusters.jsonl` (one line per group with a removed member: the kept record and its duplicates with their
similarity), `rejected.jsonl` (one line per dropped record in `filter`'s shape: reason, input line, nearest kept
or evaluation text and its similarity, the record) and `summary.json`.
"""

from __future__ import annotations

import re
import sys
import time
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from selfinstruct.config import Section
from selfinstruct.corpus import load_corpus_rows
from selfinstruct.errors import UserError
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import KEPT, REJECTED, SUMMARY, CurationRejection
from selfinstruct.store import RunDir, existing_outputs

Method = Literal["exact", "minhash", "semantic"]
FIELDS = ("instruction", "input", "output")


def known_fields(fields: list[str]) -> list[str]:
    """Validate a `--fields` list (the record fields a text is made of)."""
    for f in fields:
        if f not in FIELDS:
            raise ValueError(f"unknown field {f!r} (choose from {', '.join(FIELDS)})")
    return fields


REASONS = {"exact": "duplicate", "minhash": "near_duplicate", "semantic": "semantic_duplicate"}
CONTAMINATED = "eval_overlap"
CLUSTERS = "clusters.jsonl"
OUTPUTS = (KEPT, CLUSTERS, REJECTED, SUMMARY)
DEFAULT_THRESHOLD = {"minhash": 0.6, "semantic": 0.9, "semantic-hashed": 0.7}


class DedupConfig(Section):
    """The `[dedup]` table and the `selfinstruct dedup` flags."""

    input: str = Field(
        "",
        description="corpus: Alpaca JSON/JSONL, self-instruct seed JSONL, or a run directory (its corpus.jsonl)",
        json_schema_extra={"positional": True},
    )
    out: str | None = Field(None, description="output directory (default: <input stem>-dedup next to it)")
    method: Method = Field(
        "minhash", description="exact, minhash (near-duplicates), or semantic (embeddings)"
    )
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="minhash: Jaccard of shingle sets (default 0.6); semantic: cosine (default 0.9, hashed 0.7)",
    )
    fields: list[str] = Field(["instruction", "input"], min_length=1, description="record fields compared")
    against: str | None = Field(
        None,
        description="evaluation set: drop records that near-duplicate any of its records (decontamination)",
    )
    ngram: int = Field(5, ge=1, description="minhash: shingle size")
    shingle: Literal["char", "word"] = Field("char", description="minhash: shingles of characters or words")
    num_perm: int = Field(
        128, ge=16, description="minhash: permutations (more: finer Jaccard estimates, slower)"
    )
    encoder: str = Field(
        "auto",
        description="semantic: auto, minilm, hashed, or a sentence-transformers model directory / hub id",
    )
    batch_size: int = Field(512, ge=1, description="records judged (and written) per batch")
    seed: int = Field(1, description="minhash: permutation seed")
    force: bool = Field(False, description="overwrite the outputs in --out")

    _known_fields = field_validator("fields")(classmethod(lambda cls, fields: known_fields(fields)))


def record_text(record: CorpusRecord, fields: Sequence[str]) -> str:
    """The text compared: `fields` joined by newlines, a conversation's over all its turns (`text_of`)."""
    return "\n".join(record.text_of(f) for f in fields)


_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """What `exact` compares: NFKC, lowercase, runs of non-word characters collapsed to one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def shingles(text: str, n: int, unit: Literal["char", "word"]) -> set[str]:
    """The n-gram set of the normalised text (a text shorter than n is one shingle)."""
    norm = normalize(text)
    items: Sequence[str] = norm.split() if unit == "word" else norm
    if len(items) <= n:
        return {" ".join(items) if unit == "word" else norm}
    if unit == "word":
        return {" ".join(items[i : i + n]) for i in range(len(items) - n + 1)}
    return {norm[i : i + n] for i in range(len(norm) - n + 1)}


# ---------------------------------------------------------------- indexes: "which kept text is this close to?"

Match = tuple[int, float]  # (position of the matched text in the index, similarity)


class ExactIndex:
    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def judge(self, texts: Sequence[str], add: bool) -> list[Match | None]:
        out: list[Match | None] = []
        for text in texts:
            key = normalize(text)
            hit = self._first.get(key)
            out.append(None if hit is None else (hit, 1.0))
            if hit is None and add:
                self._first[key] = len(self._first)
        return out


class MinHashIndex:
    """MinHash-LSH for candidates, exact Jaccard of the shingle sets to decide.

    Candidates are verified exactly, so a false positive only costs a comparison while a false negative is a missed
    duplicate: the band layout is tuned for recall. Candidates whose signature estimate is far below the threshold
    (by more than `ESTIMATE_MARGIN`, about 3.5 standard deviations of a 128-permutation estimate) skip the exact
    check, which keeps corpora full of template siblings fast.
    """

    ESTIMATE_MARGIN = 0.15

    def __init__(self, threshold: float, n: int, unit: Literal["char", "word"], num_perm: int, seed: int):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold, self.n, self.unit, self.num_perm, self.seed = threshold, n, unit, num_perm, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self._sets: list[set[str]] = []
        self._sigs = np.empty((1024, num_perm), np.uint64)

    def judge(self, texts: Sequence[str], add: bool) -> list[Match | None]:
        sets = [shingles(t, self.n, self.unit) for t in texts]
        hashes = self._minhash.bulk(
            ([s.encode() for s in items] for items in sets),
            num_perm=self.num_perm,
            seed=self.seed,
            hashfunc=zlib.crc32,  # 32-bit and deterministic like datasketch's sha1 default, several times faster
        )
        out: list[Match | None] = []
        for items, mh in zip(sets, hashes, strict=True):
            best: Match | None = None
            keys = np.fromiter(self._lsh.query(mh), dtype=np.int64)
            if keys.size:
                estimate = (self._sigs[keys] == mh.hashvalues).mean(axis=1)
                for key in np.sort(keys[estimate >= self.threshold - self.ESTIMATE_MARGIN]).tolist():
                    other = self._sets[key]
                    jaccard = len(items & other) / len(items | other)
                    if jaccard >= self.threshold and (best is None or jaccard > best[1]):
                        best = (key, jaccard)
            out.append(best)
            if best is None and add:
                key = len(self._sets)
                if key == len(self._sigs):
                    self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
                self._sigs[key] = mh.hashvalues
                self._lsh.insert(key, mh, check_duplication=False)
                self._sets.append(items)
        return out


class SemanticIndex:
    """Cosine similarity of encoder vectors: one matrix product per batch against the kept ones."""

    def __init__(self, encoder: Any, threshold: float):
        from selfinstruct.embed import stack

        self.encoder, self.threshold, self._stack = encoder, threshold, stack
        self._blocks: list[Any] = []
        self._size = 0

    def judge(self, texts: Sequence[str], add: bool) -> list[Match | None]:
        from selfinstruct.embed import cosine

        vectors = self.encoder.encode(texts)
        pool = cosine(vectors, self._stack(self._blocks)) if self._size else np.empty((len(texts), 0))
        inner = cosine(vectors, vectors) if add else None
        out: list[Match | None] = []
        kept: list[int] = []
        for i in range(len(texts)):
            sims = pool[i]
            if kept and inner is not None:
                sims = np.concatenate([sims, inner[i, kept]])
            j = int(np.argmax(sims)) if sims.size else -1
            if j >= 0 and sims[j] >= self.threshold:
                out.append((j, float(sims[j])))
            else:
                out.append(None)
                if add:
                    kept.append(i)
        if add and kept:
            self._blocks.append(vectors[kept])
            self._size += len(kept)
        return out


def build_index(cfg: DedupConfig, encoder: Any = None) -> ExactIndex | MinHashIndex | SemanticIndex:
    if cfg.method == "exact":
        return ExactIndex()
    if cfg.method == "minhash":
        return MinHashIndex(effective_threshold(cfg), cfg.ngram, cfg.shingle, cfg.num_perm, cfg.seed)
    return SemanticIndex(encoder, effective_threshold(cfg, encoder))


def effective_threshold(cfg: DedupConfig, encoder: Any = None) -> float:
    if cfg.threshold is not None:
        return cfg.threshold
    if cfg.method == "semantic":
        return DEFAULT_THRESHOLD["semantic-hashed" if encoder.name == "hashed" else "semantic"]
    return DEFAULT_THRESHOLD.get(cfg.method, 1.0)


# ---------------------------------------------------------------- the command


@dataclass
class Verdict:
    reason: str | None  # None: kept
    nearest: int | None = None  # index of the kept record (duplicates) or the evaluation record
    similarity: float | None = None


def find_duplicates(
    texts: Sequence[str],
    cfg: DedupConfig,
    against: Sequence[str] = (),
    encoder: Any = None,
    on_batch: Any = None,
) -> list[Verdict]:
    """One verdict per text, in order: kept, a duplicate of an earlier kept text, or overlapping `against`.

    Whatever the method, a text equal to an earlier one after normalisation shares that one's fate (a duplicate
    of it, or of the record it went for) and one equal to an evaluation text overlaps it: an encoder sees case
    and punctuation, and a copy of a record that went for a neighbour may itself be a little further from it,
    but exact copies must all go."""
    if cfg.method == "semantic" and encoder is None:
        from selfinstruct.embed import make_encoder

        encoder = make_encoder(cfg.encoder)
    if encoder is not None:
        encoder.fit([*texts, *against])
    eval_index, eval_ids = None, []  # eval_ids: position in the index -> index into `against`
    eval_exact: dict[str, int] = {}
    if against:
        for k, text in enumerate(against):
            eval_exact.setdefault(normalize(text), k)
        eval_index = build_index(cfg, encoder)
        for start in range(0, len(against), cfg.batch_size):
            hits = eval_index.judge(against[start : start + cfg.batch_size], add=True)
            eval_ids.extend(start + i for i, hit in enumerate(hits) if hit is None)
    index = build_index(cfg, encoder)
    kept_ids: list[int] = []  # position in the index -> index into texts
    first: dict[str, int] = {}  # normalised text -> index of its first occurrence in texts
    verdicts: list[Verdict] = []
    reason = REASONS[cfg.method]
    for start in range(0, len(texts), cfg.batch_size):
        batch = list(texts[start : start + cfg.batch_size])
        out: list[Verdict | None] = [None] * len(batch)
        keys = [normalize(t) for t in batch]
        origin = [first.setdefault(key, start + i) for i, key in enumerate(keys)]
        fresh = [i for i in range(len(batch)) if origin[i] == start + i]
        for i in fresh:
            if keys[i] in eval_exact:
                out[i] = Verdict(CONTAMINATED, eval_exact[keys[i]], 1.0)
        if eval_index is not None:
            todo = [i for i in fresh if out[i] is None]
            for i, hit in zip(todo, eval_index.judge([batch[i] for i in todo], add=False), strict=True):
                if hit is not None:
                    out[i] = Verdict(CONTAMINATED, eval_ids[hit[0]], hit[1])
        todo = [i for i in fresh if out[i] is None]
        for i, hit in zip(todo, index.judge([batch[i] for i in todo], add=True), strict=True):
            if hit is None:
                out[i] = Verdict(None)
                kept_ids.append(start + i)
            else:
                out[i] = Verdict(reason, kept_ids[hit[0]], hit[1])
        for i, j in enumerate(origin):
            if j != start + i:  # an exact copy of text j (judged already: j < start + i)
                was = verdicts[j] if j < start else out[j - start]
                out[i] = Verdict(reason, j, 1.0) if was.reason is None else was  # type: ignore[union-attr]
        verdicts.extend(v for v in out if v is not None)
        if on_batch is not None:
            on_batch(len(batch))
    return verdicts


def dedup(cfg: DedupConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the dedup command; return the summary also written to OUT/summary.json."""
    if not cfg.input:
        raise UserError("dedup: give a corpus (selfinstruct dedup CORPUS --out DIR)")
    src = Path(cfg.input)
    out = Path(cfg.out) if cfg.out else src.with_name(f"{src.stem}-dedup")
    existing = existing_outputs((out / name for name in OUTPUTS), cfg.force)
    rows = load_corpus_rows(src)
    texts = [record_text(r, cfg.fields) for _, _, r in rows]
    eval_rows = load_corpus_rows(cfg.against) if cfg.against else []
    eval_texts = [record_text(r, cfg.fields) for _, _, r in eval_rows]
    encoder = None
    if cfg.method == "semantic":
        from selfinstruct.embed import make_encoder

        encoder = make_encoder(cfg.encoder)
    started = time.perf_counter()
    columns = (TextColumn(f"dedup ({cfg.method})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("dedup", total=len(texts))
        verdicts = find_duplicates(
            texts, cfg, eval_texts, encoder, on_batch=lambda n: progress.advance(task, n)
        )
    clusters: dict[int, list[int]] = defaultdict(list)
    for i, v in enumerate(verdicts):
        if v.reason is not None and v.reason != CONTAMINATED:
            clusters[v.nearest].append(i)  # type: ignore[index]
    cluster_of = {member: k for k, rep in enumerate(sorted(clusters)) for member in [rep, *clusters[rep]]}
    with RunDir(out) as run:
        for path in existing:
            path.unlink()
        kept_w, clusters_w, rejected_w = (run.writer(n) for n in OUTPUTS[:3])
        kept_w.write(obj for (_, obj, _), v in zip(rows, verdicts, strict=True) if v.reason is None)
        rejected = []
        for i, ((line, obj, rec), v) in enumerate(zip(rows, verdicts, strict=True)):
            if v.reason is None:
                continue
            nearest = eval_texts[v.nearest] if v.reason == CONTAMINATED else texts[v.nearest]  # type: ignore[index]
            row: dict[str, Any] = CurationRejection(
                instruction=rec.text_of("instruction"),
                reason=v.reason,
                stage="dedup",
                line=line,
                nearest=nearest,
                similarity=v.similarity,
            )
            if v.reason == CONTAMINATED:
                row["against_line"] = eval_rows[v.nearest][0]  # type: ignore[index]
            else:
                row["cluster"] = cluster_of[i]
            rejected.append({**row, "method": cfg.method, "record": obj})
        rejected_w.write(rejected)
        clusters_w.write(
            {
                "cluster": k,
                "size": 1 + len(clusters[rep]),
                "kept": {"line": rows[rep][0], "text": texts[rep]},
                "removed": [
                    {"line": rows[i][0], "text": texts[i], "similarity": verdicts[i].similarity}
                    for i in clusters[rep]
                ],
            }
            for k, rep in enumerate(sorted(clusters))
        )
        counts: dict[str, int] = defaultdict(int)
        for v in verdicts:
            counts[v.reason or "kept"] += 1
        summary = {
            "input": str(src),
            "against": cfg.against,
            "method": cfg.method,
            "fields": list(cfg.fields),
            "threshold": effective_threshold(cfg, encoder) if cfg.method != "exact" else None,
            "encoder": encoder.name if encoder is not None else None,
            "settings": cfg.model_dump(mode="json", exclude={"input", "out", "force"}),
            "records": len(rows),
            "kept": counts["kept"],
            "removed": len(rows) - counts["kept"],
            "rejected_by_reason": {r: n for r, n in counts.items() if r != "kept"},
            "clusters": len(clusters),
            "seconds": round(time.perf_counter() - started, 3),
            "out": str(out),
        }
        run.snapshot(SUMMARY, summary)
    return summary


def run_dedup(cfg: DedupConfig) -> int:
    s = dedup(cfg)
    reasons = ", ".join(f"{r} {n}" for r, n in s["rejected_by_reason"].items()) or "none"
    print(
        f"{s['kept']} of {s['records']} records kept ({reasons}; {s['clusters']} clusters) "
        f"in {s['seconds']:.1f} s -> {s['out']}"
    )
    return 0


# ---------------------------------------------------------------- overlap of an evaluation set with training data


def train_overlap(
    heldout: list[CorpusRecord], train: list[CorpusRecord], threshold: float = 0.6
) -> dict[str, Any]:
    """How many held-out records (instruction + input) exactly or nearly (MinHash, char 5-grams, Jaccard ≥
    `threshold`) repeat a training record: `evaluate` warns when there are any, since scores on them
    measure memorisation rather than generalisation."""
    cfg = DedupConfig(method="minhash", threshold=threshold)
    index = MinHashIndex(threshold, cfg.ngram, cfg.shingle, cfg.num_perm, cfg.seed)
    fields = ("instruction", "input")
    train_texts = [record_text(r, fields) for r in train]
    for start in range(0, len(train_texts), 1024):
        index.judge(train_texts[start : start + 1024], add=True)
    hits = index.judge([record_text(r, fields) for r in heldout], add=False)
    exact = {normalize(t) for t in train_texts}
    n_exact = sum(1 for r in heldout if normalize(record_text(r, fields)) in exact)
    examples = [r.instruction for r, h in zip(heldout, hits, strict=True) if h is not None][:3]
    near = sum(1 for h in hits if h is not None)
    return {
        "exact": n_exact,
        "near": near,
        "records": len(heldout),
        "threshold": threshold,
        "examples": examples,
    }


def warn_overlap(overlap: dict[str, Any]) -> None:
    if overlap["near"]:
        print(
            f"warning: {overlap['near']} of {overlap['records']} held-out records overlap the training corpus "
            f"({overlap['exact']} exactly; MinHash Jaccard >= {overlap['threshold']}), e.g. "
            f"{overlap['examples'][0]!r}; decontaminate with `selfinstruct dedup TRAIN --against HELDOUT`",
            file=sys.stderr,
        )
