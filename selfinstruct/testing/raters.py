"""A scripted judge for `FakeOpenAI`: answers `select`'s judge and DEITA rubric prompts, delegates the rest.

Ratings depend only on the rated response's text (a hash), so a test can recompute what the judge said with
`rating(output)` / `deita(output)` and check what `select` did with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from selfinstruct.testing.fake_openai import Reply

_RESPONSE = re.compile(r"### Response\n(.*)\n\nReply with", re.S)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def rating(output: str) -> int:
    """The judge's 1-5 rating of a response."""
    return 1 + _digest(output) % 5


def deita(output: str) -> tuple[int, int]:
    """The (complexity, quality) scores, 1-6 each, of a response."""
    d = _digest(output)
    return 1 + d % 6, 1 + (d // 6) % 6


class RatingResponder:
    """Callable for `FakeOpenAI(responder=...)`; `fallback` answers requests that are not ratings."""

    def __init__(
        self, fallback: Callable[[dict[str, Any]], str | Reply] | None = None, *, prose: bool = False
    ):
        self.fallback = fallback
        self.prose = prose  # answer in words around the numbers instead of JSON (a judge without schemas)

    def __call__(self, request: dict[str, Any]) -> str | Reply:
        text = "\n".join(m["content"] for m in request.get("messages", []))
        m = _RESPONSE.search(text)
        if m is None or "Reply with {" not in text:
            return self.fallback(request) if self.fallback else "OK"
        output = m.group(1)
        if '{"rating"' in text:
            r = rating(output)
            return f"I would rate this {r} out of 5." if self.prose else json.dumps({"rating": r})
        c, q = deita(output)
        if self.prose:
            return f"Complexity {c}, quality {q}."
        return json.dumps({"complexity": c, "quality": q})
