"""Benchmark the exact ROUGE-L novelty filter against the reference rouge-score loop.

    python benchmarks/bench_filter.py                 # pool of 50k, 50k-candidate stream, 1M-pair check
    python benchmarks/bench_filter.py --pool 5000 --candidates 5000 --pairs 100000   # quick run

Prints, measured in one run: per-candidate time of (a) the reference loop (rouge-score's scorer against the
whole pool, as Self-Instruct does, on a few sampled candidates), (b) `NoveltyIndex.query` on a batch of
candidates against the same pool, and the ratio; the total time to filter the candidate stream from an empty
pool; peak memory; and the number of decision mismatches against rouge-score on random pairs (0 expected).
The texts are synthetic but instruction-shaped: templates full of shared function words ("the", "of",
"following"), a Zipfian content vocabulary, 4-40 tokens, punctuation, some non-ASCII and empty-token strings,
and a quarter of the candidates are near-duplicates (1-3 word edits) of earlier texts.
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import sys
import time
import warnings

VERBS = (
    "write explain describe generate create list give summarize classify translate suggest compare identify "
    "find rewrite edit convert provide name design outline analyze evaluate predict recommend calculate "
    "determine brainstorm compose draft propose rank sort extract detect correct paraphrase answer"
).split()
OPENERS = (
    "|||please|can you|i want you to|you are given a text.|given the following input,|in this task you will|"
    "help me|now"
).split("|")
DETS = "a an the this that your my some two three five several the following".split()
PREPS = "of about for in on with from to into by as at between without under".split()
TAILS = (
    "|||in one sentence|in less than 50 words|for a 10-year-old|step by step|using bullet points|in a formal tone|"
    "and explain your reasoning|with examples|briefly"
).split("|")
SYLLABLES = (
    "ka lo mi ne ru sa ti vo pe da gri stel mon tar bel quin zor fa lu che ver nal dor pim ost".split()
)


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    ranked = sorted(words)
    rng.shuffle(ranked)  # frequency rank independent of spelling
    return ranked


class InstructionMaker:
    """Instruction-shaped random texts with a Zipfian content vocabulary."""

    def __init__(self, seed: int = 0, vocab_size: int = 20000):
        self.rng = random.Random(seed)
        self.words = _vocabulary(self.rng, vocab_size)
        self.cum_weights = list(itertools.accumulate(1.0 / (r + 1) ** 1.05 for r in range(vocab_size)))

    def _content(self, k: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum_weights, k=k)

    def _phrase(self) -> str:
        rng = self.rng
        parts = [rng.choice(DETS), *self._content(rng.randint(1, 3))]
        if rng.random() < 0.5:
            parts += [rng.choice(PREPS), rng.choice(DETS), *self._content(rng.randint(1, 2))]
        return " ".join(parts)

    def instruction(self) -> str:
        rng = self.rng
        parts = [rng.choice(OPENERS), rng.choice(VERBS), self._phrase()]
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            parts += [rng.choice([*PREPS, "and", "that", "which", "so that"]), self._phrase()]
        parts.append(rng.choice(TAILS))
        text = " ".join(p for p in parts if p)
        text = text[0].upper() + text[1:] + rng.choice((".", ".", "?", ":", "!"))
        r = rng.random()
        if r < 0.01:
            text = "„" + text + " — café naïve"  # non-ASCII characters split rouge tokens
        elif r < 0.015:
            text = "请把这句话翻译成英文。"  # no rouge tokens at all
        return text

    def near_duplicate(self, text: str) -> str:
        rng = self.rng
        words = text.split() or ["x"]
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            pos = rng.randrange(len(words))
            if op < 0.4:
                words[pos] = self._content(1)[0]
            elif op < 0.7 and len(words) > 1:
                del words[pos]
            else:
                words.insert(pos, rng.choice(DETS + self._content(1)))
        return " ".join(words)

    def stream(self, n: int, dup_rate: float = 0.25, history: list[str] | None = None) -> list[str]:
        """n candidates; `dup_rate` of them edit an earlier text of the stream or of `history`."""
        out: list[str] = []
        history = list(history or [])
        for _ in range(n):
            if history and self.rng.random() < dup_rate:
                out.append(self.near_duplicate(self.rng.choice(history)))
            else:
                out.append(self.instruction())
            history.append(out[-1])
        return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=50_000, help="pool size for the per-candidate comparison")
    parser.add_argument("--candidates", type=int, default=50_000, help="stream filtered from an empty pool")
    parser.add_argument("--reference-samples", type=int, default=3, help="candidates scored by rouge-score")
    parser.add_argument("--ours-samples", type=int, default=2000, help="candidates scored by the index")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="random pairs for the mismatch check")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--mean", action="store_true", help="also compute the mean F over the pool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from rouge_score import rouge_scorer

    from selfinstruct.filters.rouge import EmptyTokensWarning, NoveltyIndex

    warnings.simplefilter("ignore", EmptyTokensWarning)  # the streams contain empty-token texts on purpose
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    maker = InstructionMaker(args.seed)
    options = {"top_k": args.top_k, "compute_mean": args.mean}
    print(f"python {sys.version.split()[0]}, options {options}")

    # (a) vs (b): per-candidate time against a pool of --pool texts.
    pool = maker.stream(args.pool)
    t0 = time.perf_counter()
    index = NoveltyIndex.from_texts(pool, **options)
    build_s = time.perf_counter() - t0
    probes = maker.stream(args.ours_samples, dup_rate=0.25, history=pool)
    t0 = time.perf_counter()
    results = index.query(probes, add_kept=False)
    ours_s = (time.perf_counter() - t0) / len(probes)
    t0 = time.perf_counter()
    ref_max = [
        max(scorer.score(c, p)["rougeL"].fmeasure for p in pool) for c in probes[: args.reference_samples]
    ]
    ref_s = (time.perf_counter() - t0) / args.reference_samples
    assert ref_max == [r.max_f for r in results[: args.reference_samples]], "max F differs from rouge-score"
    rejected = sum(not r.keep for r in results)
    print(f"index build: {len(pool)} texts in {build_s:.2f} s")
    print(
        f"pool {len(pool)}: reference rouge-score loop {ref_s * 1e3:.1f} ms/candidate "
        f"({args.reference_samples} samples); ours {ours_s * 1e3:.3f} ms/candidate "
        f"({len(probes)} candidates, {rejected} rejected); speed-up {ref_s / ours_s:.0f}x"
    )
    del index, results

    # Total time to filter a stream from an empty pool.
    stream = InstructionMaker(args.seed + 1).stream(args.candidates)
    index = NoveltyIndex(**options)
    t0 = time.perf_counter()
    results = index.query(stream)
    total_s = time.perf_counter() - t0
    kept = sum(r.keep for r in results)
    print(
        f"filter {len(stream)} candidates from an empty pool: {total_s:.1f} s "
        f"({total_s / len(stream) * 1e3:.3f} ms/candidate), kept {kept}, rejected {len(stream) - kept}"
    )
    print(f"peak memory (max RSS): {peak_rss_mib():.0f} MiB")

    if args.pairs:
        check_pairs(args.pairs, args.seed, scorer)
    return 0


def tie_partners(rng: random.Random, m: int, threshold: float) -> tuple[str, list[str]]:
    """A candidate of m tokens and partners whose LCS with it makes F land on or next to the threshold.

    A partner keeps L of the candidate's tokens in order and adds fresh ones, so its LCS is exactly L; with
    L around threshold*(m+n)/2 this produces exact ties such as (L, m, n) = (7, 7, 13) or (7, 10, 10).
    """
    cand = [f"c{i}" for i in range(m)]
    partners = []
    for n in range(1, 2 * m + 3):
        for lcs in range(int(threshold * (m + n) / 2) - 1, int(threshold * (m + n) / 2) + 2):
            if 1 <= lcs <= min(m, n):
                words = sorted(rng.sample(range(m), lcs))
                tokens = [cand[i] for i in words]
                for j in range(n - lcs):
                    tokens.insert(rng.randint(0, len(tokens)), f"f{j}")
                partners.append(" ".join(tokens))
    return " ".join(cand), partners


def check_pairs(n_pairs: int, seed: int, scorer) -> None:
    """Compare with rouge-score pair by pair: every F value, the decision, and the pruned top-10."""
    from selfinstruct.filters.rouge import NoveltyIndex

    maker = InstructionMaker(seed + 2)
    rng = random.Random(seed + 3)
    texts = maker.stream(2000, dup_rate=0.5)
    specials = ["", "   ", "?!...", "— «»", "café naïve", "日本語のテキスト", "a a a a", "a b c d e f g"]
    t0 = time.perf_counter()
    mismatches = checked = at_threshold = 0
    while checked < n_pairs:
        threshold = rng.choice((0.7, 0.7, 0.5, 0.3))
        if rng.random() < 0.2:  # constructed ties around the threshold
            cand, pool = tie_partners(rng, rng.randint(1, 30), threshold)
        else:  # random texts, near-duplicates, empty, punctuation-only and non-ASCII strings
            pool = rng.sample(texts, 196) + rng.sample(specials, 4)
            cand = rng.choice(
                (rng.choice(texts), maker.near_duplicate(rng.choice(pool)), rng.choice(specials))
            )
        ref = [scorer.score(cand, p)["rougeL"].fmeasure for p in pool]
        ranked = sorted((i for i, f in enumerate(ref) if f > 0), key=lambda i: (-ref[i], i))
        ref_keep = not max(ref) > threshold
        at_threshold += sum(abs(f - threshold) < 1e-12 for f in ref)
        everything = NoveltyIndex.from_texts(pool, threshold=threshold, top_k=len(pool)).query([cand])[0]
        pruned = NoveltyIndex.from_texts(pool, threshold=threshold, top_k=10).query([cand])[0]
        mismatches += [f for _, f in everything.nearest] != [ref[i] for i in ranked]
        mismatches += pruned.nearest != [(pool[i], ref[i]) for i in ranked[:10]]
        mismatches += (everything.keep, pruned.keep) != (ref_keep, ref_keep)
        checked += len(pool)
    print(
        f"mismatch check: {checked} pairs (random, near-duplicate, empty, punctuation-only, non-ASCII, "
        f"constructed ties; {at_threshold} with F within 1e-12 of the threshold): {mismatches} mismatches "
        "in F values, top-10 or decisions, "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
