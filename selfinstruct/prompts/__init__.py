"""Prompt templates: one text file per stage and model style, shipped in this package folder.

Every text template of the project lives here (generation prompts, the Alpaca training template, the dataset
card, the HTML report); `read_template(name)` is the one way to read a packaged one.

`<stage>.chat.txt` is for chat models: an optional `[system]` section and a `[user]` section, each a line of
its own. A stage may pass *demonstrations*: each is rendered as a user turn from the same `[user]` section with
the demonstration's values, followed by an assistant turn holding its answer (real seed tasks in the exact
answer shape). Small chat models copy what an answer looks like far more faithfully than they follow a
description of it (shown a `{"instructions": ["first task", ...]}` shape, a 135M model writes "First task"). `<stage>.completion.txt` is the raw text a base model continues. Placeholders are `{{ name }}`; the
pipeline renders the variable parts (numbered example lists, few-shot blocks) in code because the parsers
depend on their exact shape, and the template holds the wording around them. One trailing newline at the end of
a file is dropped (editors add it; a base model's prompt must end exactly where the list continues).

`--prompt-dir DIR` overrides any of the files by name; the others come from the package. A template that uses a
placeholder the stage does not provide, or misses one it needs, is a UserError naming the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selfinstruct.errors import UserError

Style = Literal["chat", "completion"]

PROMPT_DIR = Path(__file__).parent


def read_template(name: str) -> str:
    """A packaged template file's text."""
    return (PROMPT_DIR / name).read_text(encoding="utf-8")


# template name -> (placeholders its caller provides, placeholders a template must use). Pipeline stages declare
# theirs through their `Stage` (selfinstruct/pipeline/stage.py), which calls `declare_template`.
VARIABLES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # `selfinstruct evolve`: one template per operation, the equality judge and the answer request
    **{
        f"evol_{op}": (frozenset({"task", "instruction", "input"}), frozenset({"task"}))
        for op in ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")
    },
    "evol_judge": (frozenset({"first", "second"}), frozenset({"first", "second"})),
    "evol_answer": (frozenset({"prompt", "instruction", "input"}), frozenset({"prompt"})),
    # `selfinstruct converse`: the user simulator sees the transcript; the assistant the conversation itself
    # (chat: its earlier turns as messages and the last user message here; completion: the transcript)
    "converse_user": (frozenset({"conversation", "turn"}), frozenset({"conversation"})),
    "converse_assistant": (frozenset({"conversation", "message"}), frozenset()),
    "select_judge": (frozenset({"instruction", "input", "output"}), frozenset({"instruction", "output"})),
    "select_deita": (frozenset({"instruction", "input", "output"}), frozenset({"instruction", "output"})),
    # `selfinstruct prefs`: the judge's rubrics
    "prefs_absolute": (frozenset({"instruction", "response"}), frozenset({"instruction", "response"})),
    "prefs_pairwise": (
        frozenset({"instruction", "first", "second"}),
        frozenset({"instruction", "first", "second"}),
    ),
}


def declare_template(name: str, provides: frozenset[str], requires: frozenset[str]) -> None:
    """Make a template name known with its placeholders (a stage declaring its templates)."""
    if VARIABLES.get(name, (provides, requires)) != (provides, requires):
        raise ValueError(f"template {name} is declared twice with different placeholders")
    VARIABLES[name] = (provides, requires)


_PLACEHOLDER = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.M)


@dataclass(frozen=True)
class Demo:
    """One worked example for a chat prompt: the values of its user turn and the assistant's answer."""

    values: Mapping[str, object]
    answer: str


@dataclass(frozen=True)
class Template:
    name: str  # e.g. "bootstrap.chat.txt"
    source: str  # where it was read from (for error messages and provenance)
    system: str | None
    body: str  # the user message (chat) or the whole prompt (completion)
    hash: str  # short sha256 of the file text: which wording produced a record
    marker: str  # the declared template name ("bootstrap"): requests rendered from it carry it

    def render(
        self, demos: Sequence[Demo] = (), **values: object
    ) -> tuple[list[dict[str, str]] | None, str | None]:
        """(messages, None) for a chat template, (None, prompt) for a completion template.

        `demos` become user/assistant turns before the real user turn (chat only: a completion template shows
        its examples inline through its own placeholders)."""

        def fill(text: str, vals: Mapping[str, object]) -> str:
            return _PLACEHOLDER.sub(lambda m: str(vals[m.group(1)]), text)

        if self.name.endswith(".chat.txt"):
            messages = [{"role": "system", "content": fill(self.system, values)}] if self.system else []
            for demo in demos:
                messages.append({"role": "user", "content": fill(self.body, {**values, **demo.values})})
                messages.append({"role": "assistant", "content": demo.answer})
            messages.append({"role": "user", "content": fill(self.body, values)})
            return messages, None
        return None, fill(self.body, values)


class Prompts:
    """The templates of one run, loaded and checked up front so a bad `--prompt-dir` fails before any request."""

    def __init__(self, style: Style, prompt_dir: str | Path | None = None):
        self.style = style
        self.prompt_dir = Path(prompt_dir) if prompt_dir else None
        if self.prompt_dir is not None and not self.prompt_dir.is_dir():
            raise UserError(f"--prompt-dir {self.prompt_dir}: not a directory")
        self._cache: dict[str, Template] = {}

    def get(self, stage: str) -> Template:
        name = f"{stage}.{self.style}.txt"
        if name not in self._cache:
            self._cache[name] = self._load(stage, name)
        return self._cache[name]

    def _load(self, stage: str, name: str) -> Template:
        override = self.prompt_dir / name if self.prompt_dir else None
        if override is not None and override.is_file():
            source = str(override)
            try:
                text = override.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{override}: cannot read prompt template ({e})") from None
        else:
            source = f"selfinstruct/prompts/{name}"
            text = read_template(name)
        return parse_template(stage, name, source, text)


def parse_template(stage: str, name: str, source: str, text: str) -> Template:
    if stage not in VARIABLES:
        raise KeyError(f"template {stage} is not declared (a Stage's `templates` or prompts.VARIABLES)")
    provided, required = VARIABLES[stage]
    used = set(_PLACEHOLDER.findall(text))
    if unknown := sorted(used - provided):
        raise UserError(
            f"{source}: unknown placeholder {{{{{unknown[0]}}}}} (this template may use: {', '.join(sorted(provided))})"
        )
    if missing := sorted(required - used):
        raise UserError(f"{source}: the template never uses {{{{{missing[0]}}}}}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    if text.endswith("\n"):
        text = text[:-1]
    system = None
    if name.endswith(".chat.txt"):
        parts = _SECTION.split(text)
        # parts = [before, role, content, role, content, ...]
        if parts[0].strip() or len(parts) == 1:
            raise UserError(
                f"{source}: a chat template needs a [user] section (and optionally [system] first)"
            )
        sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts), 2)}
        if "user" not in sections:
            raise UserError(f"{source}: a chat template needs a [user] section")
        system, text = sections.get("system"), sections["user"]
    return Template(name, source, system, text, digest, stage)
