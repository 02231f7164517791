"""Benchmark `selfinstruct dedup`: MinHash speed on a large corpus, and recall/precision on the paraphrase fixture.

    python benchmarks/bench_dedup.py                      # both parts: 100k records, then the fixture table
    python benchmarks/bench_dedup.py --records 20000 --skip-fixture     # quick speed check
    python benchmarks/bench_dedup.py --skip-speed --encoders hashed     # table without the neural encoder

Speed: writes an Alpaca JSONL of `--records` instruction-shaped records from the fake teacher's grammar (10% of
them rewritten copies of earlier ones, as in the fixture), then times the whole command (read, MinHash-LSH with
the default settings, write kept/clusters/rejected) and reports records per second, peak memory and the goal
(100k records in at most 5 minutes on this 2-core machine).

Quality: `selfinstruct.testing.paraphrase.build_fixture` (1,000 distinct tasks, many of them near-identical
template siblings that must stay, plus 1,000 rewritten copies of five kinds) deduplicated by each method at a
few thresholds; prints the Markdown table the README shows (recall = copies removed and matched to their own
task, precision = removed records that really were copies).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from selfinstruct.dedup import DedupConfig, dedup, find_duplicates, normalize, record_text
from selfinstruct.records import CorpusRecord
from selfinstruct.testing.paraphrase import KINDS, build_fixture, rewrite, score_clusters
from selfinstruct.testing.responders import PipelineResponder


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    responder = PipelineResponder(seed)
    rows: list[dict[str, str]] = []
    for k in range(n):
        if rows and rng.random() < 0.1:
            copy = dict(rows[rng.randrange(len(rows))])
            copy["instruction"] = rewrite(copy["instruction"], KINDS[k % len(KINDS)], rng)
            rows.append(copy)
        else:
            rows.append(responder._task(rng))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def speed(records: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        make_corpus(corpus, records)
        print(
            f"built {records:,} records in {time.perf_counter() - t0:.1f} s ({corpus.stat().st_size / 1e6:.1f} MB)"
        )
        t0 = time.perf_counter()
        summary = dedup(DedupConfig(input=str(corpus), out=str(Path(tmp) / "out"), method="minhash"))
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"minhash dedup of {records:,} records: {seconds:.1f} s end to end ({records / seconds:,.0f} records/s), "
        f"{summary['removed']:,} removed in {summary['clusters']:,} clusters, peak RSS {peak:,.0f} MB"
    )
    goal = 300 * records / 100_000
    print(
        f"goal: <= {goal:.0f} s for {records:,} records (5 min per 100k): {'met' if seconds <= goal else 'NOT met'}"
    )


def fixture_table(encoders: list[str]) -> None:
    fixture = build_fixture()
    texts = [record_text(CorpusRecord.from_dict(r.record), ["instruction", "input"]) for r in fixture]
    settings: list[tuple[str, dict]] = [("exact", {"method": "exact"})]
    for t in (0.5, 0.6, 0.7):
        settings.append((f"minhash, char 5-grams, Jaccard ≥ {t}", {"method": "minhash", "threshold": t}))
    settings.append(
        (
            "minhash, word 2-grams, Jaccard ≥ 0.5",
            {"method": "minhash", "threshold": 0.5, "ngram": 2, "shingle": "word"},
        )
    )
    thresholds = {"hashed": (0.5, 0.6, 0.7), "minilm": (0.8, 0.85, 0.9, 0.95)}
    for enc in encoders:
        for t in thresholds.get(enc, (0.9,)):
            settings.append(
                (f"semantic, {enc}, cosine ≥ {t}", {"method": "semantic", "encoder": enc, "threshold": t})
            )
    seen: set[str] = set()
    exact_copies = []  # records equal (after normalisation) to an earlier one: every method must remove them
    for i, text in enumerate(texts):
        if normalize(text) in seen:
            exact_copies.append(i)
        seen.add(normalize(text))
    kinds = " | ".join(KINDS)
    print(
        f"\nparaphrase fixture: {len(fixture):,} records ({sum(r.kind == 'base' for r in fixture):,} distinct tasks)"
    )
    print(f"| method | recall | precision | {kinds} | exact copies removed | seconds |")
    print("|---|--:|--:|" + "--:|" * len(KINDS) + "--:|--:|")
    for name, kw in settings:
        t0 = time.perf_counter()
        verdicts = find_duplicates(texts, DedupConfig(**kw))
        seconds = time.perf_counter() - t0
        s = score_clusters(fixture, [v.nearest if v.reason else None for v in verdicts])
        per_kind = " | ".join(f"{100 * s['by_kind'][k]:.0f}%" for k in KINDS)
        exact = sum(verdicts[i].reason is not None for i in exact_copies) / len(exact_copies)
        print(
            f"| {name} | {100 * s['recall']:.1f}% | {100 * s['precision']:.1f}% | {per_kind} | "
            f"{100 * exact:.0f}% of {len(exact_copies)} | {seconds:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-fixture", action="store_true")
    parser.add_argument("--encoders", default="hashed,minilm", help="semantic encoders in the table")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args.records)
    if not args.skip_fixture:
        fixture_table([e for e in args.encoders.split(",") if e])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
