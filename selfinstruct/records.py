"""The data that flows between stages.

Plain dataclasses with `to_dict`/`from_dict`: every stage reads and writes JSON lines, and a record read back
must equal the record written. Fields the reference formats do not have live under `meta`, so a corpus stays
loadable by tools that only know `instruction`/`input`/`output`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Instance:
    """One input/output pair of a task; `input` is "" when the task needs none."""

    input: str = ""
    output: str = ""


@dataclass
class SeedTask:
    """A human-written task in the self-instruct seed format (plus an optional `category`)."""

    id: str
    name: str
    instruction: str
    instances: list[Instance]
    is_classification: bool = False
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.category is None:
            d.pop("category")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedTask:
        return cls(
            id=d["id"],
            name=d["name"],
            instruction=d["instruction"],
            instances=[Instance(**i) for i in d["instances"]],
            is_classification=d.get("is_classification", False),
            category=d.get("category"),
        )


@dataclass
class InstructionRecord:
    """A machine-generated instruction kept by the filters, with its provenance.

    `most_similar` maps the nearest pool instructions to their ROUGE-L F (the reference keeps 10) and
    `avg_similarity` is the mean F over the whole pool at the time it was kept (None when not computed).
    """

    id: str
    instruction: str
    round: int = 0
    origin: str = "machine"
    is_classification: bool | None = None
    instances: list[Instance] = field(default_factory=list)
    most_similar: dict[str, float] = field(default_factory=dict)
    avg_similarity: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstructionRecord:
        d = dict(d)
        d["instances"] = [Instance(**i) for i in d.get("instances", [])]
        return cls(**d)


@dataclass
class CorpusRecord:
    """One training example in Alpaca shape; anything else goes under `meta`.

    A conversation (chat input, `converse`) also carries `messages`, the whole exchange with roles (system turn
    included); its Alpaca fields then hold the first user turn and the answer to it, for single-turn tools.
    """

    instruction: str
    input: str = ""
    output: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON object (`meta` only when set): Alpaca fields, or the chat form `messages` for a
        conversation. Built directly: `dataclasses.asdict` deep-copies every value and was most of the time
        spent writing a 100k-record corpus."""
        if self.messages is not None:
            d: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        else:
            d = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def user_message(self) -> str:
        """The record as one chat user turn: the instruction, then a blank line and the input when there is one.

        Training, evaluation and the chat exports must all agree on this, so it lives with the record.
        """
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction

    def conversation(self) -> list[dict[str, str]]:
        """The record as chat messages: its own for a conversation, else one user turn and the answer."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [
            {"role": "user", "content": self.user_message()},
            {"role": "assistant", "content": self.output},
        ]

    def text_of(self, field: str) -> str:
        """A field's text as the curation commands (`dedup`, `select`, `filter`) judge it. A conversation counts
        whole: its `instruction` is every user turn and its `output` every assistant turn, in order and joined by
        blank lines, its `input` is empty (the system turn is in none of them); an Alpaca record's own field."""
        if self.messages is None:
            return getattr(self, field)
        role = {"instruction": "user", "output": "assistant"}.get(field)
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == role) if role else ""

    @property
    def turns(self) -> int:
        """User/assistant exchanges (1 for an Alpaca record)."""
        return sum(m["role"] == "assistant" for m in self.messages) if self.messages is not None else 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusRecord:
        """Inverse of `to_dict` for our own files (other chat files go through `selfinstruct.corpus`)."""
        if "messages" in d:
            messages = [{"role": m["role"], "content": m["content"]} for m in d["messages"]]
            first = next(k for k, m in enumerate(messages) if m["role"] == "user")
            return cls(
                messages[first]["content"],
                "",
                messages[first + 1]["content"],
                dict(d.get("meta") or {}),
                messages,
            )
        return cls(
            instruction=d["instruction"],
            input=d.get("input", "") or "",
            output=d.get("output", "") or "",
            meta=dict(d.get("meta") or {}),
        )
