"""Cheap rule-based filters that run before the ROUGE-L novelty check, and the settings of all filters.

Each filter is a small object with a stable `name`; calling it on an instruction returns None to keep it or a
reason string to reject it. Reasons are stable identifiers (they are counted in summaries and written to
rejected.jsonl): `empty`, `too_short`, `too_long`, `blacklisted:<word>`, `write_a_program`,
`starts_with_punctuation`, `starts_with_non_ascii`, `duplicate`.

The rules and their order follow the Self-Instruct and Alpaca reference code: word count (reject <= 3 or
> 150 whitespace-separated words), blacklisted whole words (case-insensitive), "Write a program" at the start,
a first character that is punctuation or non-ASCII. The references check an already whitespace-collapsed,
capitalised string; these filters look at the text with leading whitespace removed and match "Write a
program" and blacklisted words case-insensitively, which gives the same verdicts on such strings.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import Field

from selfinstruct.config import Section

SELF_INSTRUCT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to",
)  # fmt: skip
"""Words an instruction may not contain in Self-Instruct (tasks a text-only model cannot do)."""

ALPACA_BLACKLIST = (*SELF_INSTRUCT_BLACKLIST, "video", "audio", "music", "flowchart", "diagram")
"""Stanford Alpaca's list: Self-Instruct's plus five media words (18 entries)."""

BLACKLISTS = {"alpaca": ALPACA_BLACKLIST, "self-instruct": SELF_INSTRUCT_BLACKLIST, "none": ()}


class Heuristic(Protocol):
    name: str

    def __call__(self, text: str) -> str | None: ...


@dataclass(frozen=True)
class NotEmpty:
    name: str = field(default="empty", init=False)

    def __call__(self, text: str) -> str | None:
        return "empty" if not text.strip() else None


@dataclass(frozen=True)
class WordCount:
    """Keep instructions with min_words..max_words whitespace-separated words (reference: 4..150)."""

    min_words: int = 4
    max_words: int = 150
    name: str = field(default="length", init=False)

    def __call__(self, text: str) -> str | None:
        n = len(text.split())
        return "too_short" if n < self.min_words else "too_long" if n > self.max_words else None


@dataclass(frozen=True)
class Blacklist:
    """Reject an instruction containing one of `words` as a whole word, ignoring case and spacing."""

    words: tuple[str, ...] = ALPACA_BLACKLIST
    name: str = field(default="blacklist", init=False)
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = sorted({" ".join(w.lower().split()) for w in self.words if w.strip()}, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
        object.__setattr__(self, "_pattern", re.compile(rf"\b(?:{alternatives})\b", re.I) if words else None)

    def __call__(self, text: str) -> str | None:
        match = self._pattern.search(text) if self._pattern else None
        return f"blacklisted:{' '.join(match.group().lower().split())}" if match else None


@dataclass(frozen=True)
class WriteAProgram:
    """Reject "Write a program ...": the reference found models append it to everything."""

    name: str = field(default="write_a_program", init=False)

    def __call__(self, text: str) -> str | None:
        return "write_a_program" if text.lstrip().lower().startswith("write a program") else None


@dataclass(frozen=True)
class StartsWithPunctuation:
    name: str = field(default="starts_with_punctuation", init=False)

    def __call__(self, text: str) -> str | None:
        stripped = text.lstrip()
        return "starts_with_punctuation" if stripped and stripped[0] in string.punctuation else None


@dataclass(frozen=True)
class StartsWithNonAscii:
    name: str = field(default="starts_with_non_ascii", init=False)

    def __call__(self, text: str) -> str | None:
        stripped = text.lstrip()
        return "starts_with_non_ascii" if stripped and not stripped[0].isascii() else None


@dataclass(frozen=True)
class Repetitive:
    """Reject a text that loops on itself: more than `max_share` of its word n-grams repeat an earlier one.

    Not a reference rule: small teachers decoding greedily fall into loops ("I love to dream. I love to
    dream. ..."), which no other rule catches. Texts shorter than `min_words` are never judged (a short list
    may repeat a word legitimately)."""

    n: int = 3
    max_share: float = 0.5
    min_words: int = 12
    name: str = field(default="repetitive", init=False)

    def __call__(self, text: str) -> str | None:
        words = text.casefold().split()
        if len(words) < self.min_words:
            return None
        grams = [tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1)]
        repeated = 1 - len(set(grams)) / len(grams)
        return "repetitive" if repeated > self.max_share else None


def normalize(text: str) -> str:
    """The form in which two instructions count as the same: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


class Duplicate:
    """Reject an instruction equal (after `normalize`) to a pool text or to an earlier one that got here.

    Every text that passes is remembered, whatever later filters decide, so the verdict does not depend on
    how candidates are batched. A repeat of a rejected candidate would be rejected by ROUGE-L anyway (same
    tokens), only under this more precise name.
    """

    name = "duplicate"

    def __init__(self, pool: Iterable[str] = ()):
        self.seen = {normalize(t) for t in pool}

    def add(self, texts: Iterable[str]) -> None:
        self.seen.update(normalize(t) for t in texts)

    def __call__(self, text: str) -> str | None:
        key = normalize(text)
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        return None


class FilterConfig(Section):
    """Settings of the heuristic and novelty filters (TOML table `[filters]`, shared by generate and filter)."""

    min_words: int = Field(
        4, ge=0, description="reject instructions with fewer words (reference: 4, i.e. <= 3)"
    )
    max_words: int = Field(150, ge=1, description="reject instructions with more words (reference: 150)")
    blacklist: Literal["alpaca", "self-instruct", "none"] = Field(
        "alpaca", description="blacklisted-word preset (alpaca: 18 words; self-instruct: its 13)"
    )
    extra_blacklist: list[str] = Field([], description="more blacklisted words or phrases")
    check_length: bool = Field(True, description="apply the word-count bounds")
    check_blacklist: bool = Field(True, description="reject instructions containing a blacklisted word")
    check_write_a_program: bool = Field(
        True, description="reject instructions starting with 'Write a program'"
    )
    check_punctuation: bool = Field(True, description="reject instructions starting with punctuation")
    check_non_ascii: bool = Field(True, description="reject instructions starting with a non-ASCII character")
    check_duplicate: bool = Field(True, description="reject exact duplicates (ignoring case and spacing)")
    threshold: float = Field(
        0.7, ge=0, le=1, description="reject when ROUGE-L F against any pool instruction is above this"
    )
    use_stemmer: bool = Field(False, description="Porter-stem ROUGE tokens, as rouge-score's use_stemmer")
    rouge_tokenizer: Literal["rouge", "unicode"] = Field(
        "rouge",
        description="rouge: rouge-score's ASCII tokenizer (reference); unicode: any-script words, CJK per char",
    )
    nearest_k: int = Field(10, ge=0, description="most similar pool instructions recorded per candidate")
    mean_similarity: bool = Field(
        False, description="also record the mean ROUGE-L F over the pool (scores every overlapping pair)"
    )


class Heuristics:
    """The rule chain in reference order; the first failing rule names the reason.

    Stateful through the duplicate check: a text that passes is remembered, so the same text judged again is
    a `duplicate`.
    """

    def __init__(self, rules: list[Heuristic], duplicate: Duplicate | None = None):
        self.rules = rules
        self.duplicate = duplicate

    def add(self, texts: Iterable[str]) -> None:
        """Register pool texts (seeds, earlier kept instructions) for the duplicate check."""
        if self.duplicate is not None:
            self.duplicate.add(texts)

    def __call__(self, text: str) -> str | None:
        for rule in self.rules:
            reason = rule(text)
            if reason is not None:
                return reason
        return self.duplicate(text) if self.duplicate is not None else None


def build_heuristics(cfg: FilterConfig, pool: Iterable[str] = ()) -> Heuristics:
    """The chain `cfg` switches on; `pool` texts count as already seen for the duplicate check."""
    rules: list[Heuristic] = [NotEmpty()]
    if cfg.check_length:
        rules.append(WordCount(cfg.min_words, cfg.max_words))
    if cfg.check_blacklist and (words := (*BLACKLISTS[cfg.blacklist], *cfg.extra_blacklist)):
        rules.append(Blacklist(words))
    if cfg.check_write_a_program:
        rules.append(WriteAProgram())
    if cfg.check_punctuation:
        rules.append(StartsWithPunctuation())
    if cfg.check_non_ascii:
        rules.append(StartsWithNonAscii())
    return Heuristics(rules, Duplicate(pool) if cfg.check_duplicate else None)
