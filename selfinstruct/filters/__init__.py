"""Filters for candidate instructions: rule-based heuristics, then the exact ROUGE-L novelty check.

`CandidateFilter` is the one object a pipeline needs: give it the pool (seeds, instructions kept in earlier
sessions), then feed it candidates in order; each gets a `Decision` (keep, or the reason to reject, plus the
similarity metadata) and every kept candidate joins the pool before the next one is judged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from selfinstruct.filters.heuristics import FilterConfig, Heuristics, build_heuristics
from selfinstruct.filters.rouge import NoveltyIndex, NoveltyResult

__all__ = ["TOO_SIMILAR", "CandidateFilter", "Decision", "FilterConfig", "NoveltyIndex", "novelty_index"]

TOO_SIMILAR = "too_similar"
"""The reason of a candidate whose ROUGE-L F against some pool instruction is above the threshold."""


def novelty_index(cfg: FilterConfig, pool: Iterable[str] = ()) -> NoveltyIndex:
    """A `NoveltyIndex` with `cfg`'s settings, holding `pool`."""
    index = NoveltyIndex(
        cfg.threshold,
        use_stemmer=cfg.use_stemmer,
        tokenizer=cfg.rouge_tokenizer,
        top_k=cfg.nearest_k,
        compute_mean=cfg.mean_similarity,
    )
    index.add(pool)
    return index


@dataclass(frozen=True)
class Decision:
    """The verdict on one candidate.

    `reason` is None when kept. The similarity fields come from the novelty check (see `NoveltyResult`); they
    are None / empty when that check did not run (a heuristic rejected the candidate, or it is switched off).
    """

    keep: bool
    reason: str | None = None
    max_f: float | None = None
    nearest: list[tuple[str, float]] = field(default_factory=list)
    mean_f: float | None = None

    @classmethod
    def from_novelty(cls, result: NoveltyResult) -> Decision:
        reason = None if result.keep else TOO_SIMILAR
        return cls(result.keep, reason, result.max_f, result.nearest, result.mean_f)


class CandidateFilter:
    """Heuristics, then novelty, over candidates in order; `counts` tallies "kept" and every reason."""

    def __init__(
        self,
        cfg: FilterConfig | None = None,
        *,
        pool: Iterable[str] = (),
        heuristics: bool = True,
        novelty: bool = True,
    ):
        self.cfg = cfg or FilterConfig()
        pool = list(pool)
        self.heuristics: Heuristics | None = build_heuristics(self.cfg, pool) if heuristics else None
        self.index: NoveltyIndex | None = novelty_index(self.cfg, pool) if novelty else None
        self.counts: Counter[str] = Counter()

    def add_pool(self, texts: Iterable[str]) -> None:
        """Add texts to the pool without judging them (e.g. instructions kept before a resume)."""
        texts = list(texts)
        if self.heuristics is not None:
            self.heuristics.add(texts)
        if self.index is not None:
            self.index.add(texts)

    def __call__(self, texts: Sequence[str]) -> list[Decision]:
        reasons = [self.heuristics(t) if self.heuristics is not None else None for t in texts]
        decisions = [Decision(False, r) if r is not None else Decision(True) for r in reasons]
        passed = [i for i, r in enumerate(reasons) if r is None]
        if self.index is not None and passed:
            for i, result in zip(passed, self.index.query([texts[i] for i in passed]), strict=True):
                decisions[i] = Decision.from_novelty(result)
        self.counts.update(d.reason or "kept" for d in decisions)
        return decisions
