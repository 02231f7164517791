"""Turn teacher completions into instructions, tasks, labels and instances.

Two paths per stage. With structured output the teacher was forced to answer in the stage's JSON schema (below),
so the JSON is read directly. Without it (plain chat models, base completion models, servers that reject
`response_format`) the same functions fall back to a tolerant reader for what models actually write: JSON with
or without code fences, numbered lists ("1.", "1)", "Task 1:"), bullets, **bold** labels, preambles and
closing chatter. Every parser returns what it could read plus how many pieces it could not (`unparseable`), so
the run can count parse failures instead of silently losing them.

Truncation (`finish_reason == "length"`): only the last, cut-off item is dropped, except for the self-instruct
bootstrap with a base completion model, where the reference discards the whole completion (`truncated=True`
there is handled by the caller).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from selfinstruct.records import Instance

# ---------------------------------------------------------------- JSON schemas (one per stage)

# The subset of JSON Schema that OpenAI's strict mode, vLLM (xgrammar) and most providers accept: every key
# required, no additional properties, and string lengths only on request (OpenAI rejects maxLength; local
# engines honour it, which stops a weak model from spending all of max_tokens inside one string).


def _text(max_chars: int | None) -> dict[str, Any]:
    return {"type": "string"} if max_chars is None else {"type": "string", "maxLength": max_chars}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """An object with exactly these keys, all required (what strict structured output demands)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _list_of(key: str, item: dict[str, Any], max_items: int) -> dict[str, Any]:
    """`{key: [item, ...]}` with 1 to `max_items` items."""
    return _object({key: {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}})


def instructions_schema(max_items: int, max_chars: int | None = None) -> dict[str, Any]:
    """Bootstrap: `{"instructions": ["...", ...]}`."""
    return _list_of("instructions", _text(max_chars), max_items)


def tasks_schema(max_items: int, max_chars: int | None = None) -> dict[str, Any]:
    """Alpaca: `{"tasks": [{"instruction", "input", "output"}, ...]}` (`input` is "" when none is needed)."""
    task = _object({k: _text(max_chars) for k in ("instruction", "input", "output")})
    return _list_of("tasks", task, max_items)


CLASSIFY_SCHEMA: dict[str, Any] = _object({"is_classification": {"type": "boolean"}})


def instances_schema(max_items: int, output_first: bool, max_chars: int | None = None) -> dict[str, Any]:
    """Instances: input-first `{"input", "output"}`; output-first `{"label", "input"}` (label generated first)."""
    keys = ("label", "input") if output_first else ("input", "output")
    return _list_of("instances", _object({k: _text(max_chars) for k in keys}), max_items)


# ---------------------------------------------------------------- results


@dataclass
class Parsed:
    """What one completion yielded: the items read and the number of pieces that could not be read."""

    items: list[Any] = field(default_factory=list)
    unparseable: int = 0


@dataclass
class TaskDraft:
    """A complete task from a one-step (Alpaca) completion."""

    instruction: str
    input: str
    output: str


# ---------------------------------------------------------------- shared helpers

_WS = re.compile(r"\s+")
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_JSON_START = re.compile(r"^\s*[\[{]", re.M)
_NOINPUT = {"<noinput>", "<no input>", "noinput", "<none>", "<empty>"}


def collapse(text: str) -> str:
    """Collapse runs of whitespace to one space and strip (the reference does this to every instruction)."""
    return _WS.sub(" ", text).strip()


def shown(instruction: str) -> str:
    """An instruction as a prompt shows it, normalised as the reference does: whitespace collapsed, stripped,
    no trailing ":". A seed with a line break inside would otherwise break the numbered list a base model
    continues."""
    return collapse(instruction).rstrip(":")


def _unfence(text: str) -> str:
    """The contents of the code fences if there are any (a model may wrap JSON or a list in ```json ... ```)."""
    blocks = _FENCE.findall(text)
    return "\n".join(blocks) if blocks else text


def _clean_input(value: str) -> str:
    value = value.strip()
    return "" if value.lower() in _NOINPUT else value


def _json_values(text: str) -> tuple[Any, bool]:
    """Decode the first JSON value in `text`: (value, True) when complete, (None, False) when absent/broken."""
    m = _JSON_START.search(text)
    if m is None:
        return None, False
    start = m.end() - 1
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None, False
    return value, True


def _list_in(value: Any, keys: tuple[str, ...]) -> list[Any] | None:
    """The list a JSON answer carries: the value itself, under one of `keys`, or its only list value."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for k in keys:
            if isinstance(value.get(k), list):
                return value[k]
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    return None


def _salvage_array(text: str, after_key: str | None) -> tuple[list[Any], bool]:
    """Complete elements of a JSON array that was cut off (finish_reason length); (elements, found an array)."""
    pos = 0
    if after_key is not None:
        m = re.search(rf'"{re.escape(after_key)}"\s*:\s*\[', text)
        if not m:
            return [], False
        pos = m.end()
    else:
        pos = text.find("[")
        if pos < 0:
            return [], False
        pos += 1
    decoder = json.JSONDecoder()
    items: list[Any] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        items.append(value)
    return items, True


def _text_of(item: Any, keys: tuple[str, ...]) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for k in keys:
            if isinstance(item.get(k), str):
                return item[k]
    return None


# ---------------------------------------------------------------- bootstrap: instruction lists

_ITEM = re.compile(
    r"""^\s*(?:[#>]+\s*)?(?:\*\*|__)?\s*               # markdown heading / quote / bold opener
        (?:(?:task|instruction|item|question)\s*\#?\s*)?  # "Task 1:", "Instruction #2."
        \(?(\d{1,3})\s*[.):\]]                         # the number and its punctuation
        (?:\s*(?:\*\*|__))?(?=\s|$)\s*(.*)$""",
    re.I | re.X,
)
_BULLET = re.compile(r"^\s*[-*•+]\s+(.*)$")
_LABEL = re.compile(
    r"^(?:\*\*|__)?\s*(?:task|instruction|new task|new instruction)\s*\d*\s*:\s*(?:\*\*|__)?\s*", re.I
)
_CONTINUED_ITEM = re.compile(r"\n\s*\d+\s*\.\s")


def _strip_item(text: str) -> str:
    text = _LABEL.sub("", text.strip())
    text = text.replace("**", "").replace("__", "")
    text = collapse(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def parse_continued_list(text: str) -> list[str]:
    """A base model's continuation of a numbered list that the prompt left open at an item ("9.").

    The text up to the first `\\n<n>. ` finishes the open item; every later `\\n<n>. ` starts a new one.
    Whitespace inside an item is collapsed, empty items are dropped.
    """
    return [c for c in (collapse(part) for part in _CONTINUED_ITEM.split(text)) if c]


def parse_instruction_list(text: str, truncated: bool = False) -> Parsed:
    """Instructions from a chat answer: JSON (`{"instructions": [...]}` or an array), else a list in prose.

    A truncated JSON answer keeps its complete strings; a truncated prose list loses its last item.
    """
    body = _unfence(text)
    value, ok = _json_values(body)
    if ok:
        items = _list_in(value, ("instructions", "tasks"))
        if items is not None:
            return _instruction_items(items)
    stripped = body.lstrip()
    if stripped.startswith(("{", "[")):
        items, found = _salvage_array(stripped, "instructions" if stripped.startswith("{") else None)
        if found:
            parsed = _instruction_items(items)
            parsed.unparseable += 0 if truncated else 1  # a broken JSON answer that was not cut off
            return parsed
    items = _prose_items(body)
    if truncated and items:
        items.pop()
    return Parsed(items, 0 if items else 1)


def _instruction_items(items: list[Any]) -> Parsed:
    out = Parsed()
    for item in items:
        text = _text_of(item, ("instruction", "task", "text"))
        cleaned = _strip_item(text) if text is not None else ""
        if cleaned:
            out.items.append(cleaned)
        else:
            out.unparseable += 1
    return out


def _prose_items(text: str) -> list[str]:
    """Numbered or bulleted items; continuation lines join the open item, a blank line closes it."""
    items: list[list[str]] = []
    open_item = False
    for line in text.splitlines():
        m = _ITEM.match(line) or _BULLET.match(line)
        if m:
            items.append([m.group(m.lastindex or 1)])
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1].append(line)
    if not items:  # no markers at all: one instruction per non-empty line, if it is short enough to be one
        lines = [ln for ln in text.splitlines() if ln.strip()]
        items = [[ln] for ln in lines] if len(lines) > 1 else []
    return [t for t in (_strip_item(" ".join(parts)) for parts in items) if t]


# ---------------------------------------------------------------- Alpaca: complete tasks

_FIELD = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?(?:\d+[ \t]*[.)][ \t]*)?(?:\*\*|__)?[ \t]*(instruction|input|output)[ \t]*(?:\*\*|__)?[ \t]*:"
    r"(?:[ \t]*(?:\*\*|__))?[ \t]*",
    re.I | re.M,
)
# `N. Instruction:` / `N. Input:` / `N. Output:` (the reference's list format), possibly bold or as a heading.
_NUMBERED_FIELD = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?(?:\*\*|__)?[ \t]*(\d+)[ \t]*[.)][ \t]*(?:\*\*|__)?[ \t]*(instruction|input|output)"
    r"[ \t]*(?:\*\*|__)?[ \t]*:(?:[ \t]*(?:\*\*|__))?[ \t]*",
    re.I | re.M,
)
_TRAILING_SEPARATOR = re.compile(r"(?:\n[ \t]*(?:#{3,}|-{3,}|\*{3,}|\d+[ \t]*[.)])[ \t]*)+\s*\Z")
_FIELD_ORDER = {"instruction": 0, "input": 1, "output": 2}


def parse_tasks(text: str, truncated: bool = False) -> Parsed:
    """Tasks from a one-step answer: JSON (`{"tasks": [...]}` or an array) or `Instruction:/Input:/Output:` blocks.

    A task needs an instruction and an output; a missing input means none ("<noinput>" is read as "").
    """
    body = _unfence(text)
    value, ok = _json_values(body)
    if ok and (items := _list_in(value, ("tasks", "instructions"))) is not None:
        return _task_items(items)
    stripped = body.lstrip()
    if stripped.startswith(("{", "[")) and not _FIELD.search(body):
        items, found = _salvage_array(stripped, "tasks" if stripped.startswith("{") else None)
        if found:
            parsed = _task_items(items)
            parsed.unparseable += 0 if truncated else 1
            return parsed
    return _task_blocks(body, truncated)


def _task_items(items: list[Any]) -> Parsed:
    out = Parsed()
    for item in items:
        if (
            isinstance(item, dict)
            and isinstance(item.get("instruction"), str)
            and isinstance(item.get("output"), str)
        ):
            instruction = collapse(item["instruction"])
            raw_input = item.get("input")
            if instruction and item["output"].strip():
                out.items.append(
                    TaskDraft(
                        instruction,
                        _clean_input(raw_input if isinstance(raw_input, str) else ""),
                        item["output"].strip(),
                    )
                )
                continue
        out.unparseable += 1
    return out


def _field_value(text: str) -> str:
    """A field's text without the separator line (`###`, `---`, a lone item number) that closes the task."""
    return _TRAILING_SEPARATOR.sub("", text.strip()).strip()


def _numbered_marks(text: str) -> list[tuple[re.Match[str], str]]:
    """The field markers of a numbered list, item by item: `N. Instruction:` opens item N (the next number
    after the previous item), and only item N's own `N. Input:` / `N. Output:`, in that order, belong to it.
    Any other field-like line (`Input: [1, 2]` in a coding answer, another item's number) is text.
    """
    accepted: list[tuple[re.Match[str], str]] = []
    number: int | None = None
    for m in _NUMBERED_FIELD.finditer(text):
        n, name = int(m.group(1)), m.group(2).lower()
        if name == "instruction" and (number is None or n == number + 1):
            number = n
        elif n != number or _FIELD_ORDER[name] <= _FIELD_ORDER[accepted[-1][1]]:
            continue
        accepted.append((m, name))
    return accepted


def _task_blocks(text: str, truncated: bool) -> Parsed:
    """`N. Instruction:` lists split on their items' own markers only; unnumbered blocks on any field line."""
    numbered = _numbered_marks(text)
    marks = numbered or [(m, m.group(1).lower()) for m in _FIELD.finditer(text)]
    tasks: list[dict[str, str]] = []
    for i, (m, name) in enumerate(marks):
        end = marks[i + 1][0].start() if i + 1 < len(marks) else len(text)
        if name == "instruction" or not tasks or name in tasks[-1]:
            tasks.append({})
        tasks[-1][name] = _field_value(text[m.end() : end])
    if truncated and tasks:
        tasks.pop()
    out = Parsed()
    for t in tasks:
        instruction, output = collapse(t.get("instruction", "")), t.get("output", "")
        if instruction and output:
            out.items.append(TaskDraft(instruction, _clean_input(t.get("input", "")), output))
        else:
            out.unparseable += 1
    if not marks and text.strip():
        out.unparseable += 1
    return out


# ---------------------------------------------------------------- classification identification

_YES_NO = re.compile(r"^[\s*_\"'`>#-]*(?:answer\s*:\s*)?(yes|no|true|false)\b", re.I)


def parse_yes_no(text: str) -> bool | None:
    """True/False from `{"is_classification": bool}` or an answer starting with yes/no/true/false; else None."""
    value, ok = _json_values(_unfence(text))
    if ok and isinstance(value, dict):
        for v in value.values():
            if isinstance(v, bool):
                return v
    m = _YES_NO.match(text)
    if m:
        return m.group(1).lower() in ("yes", "true")
    return None


# ---------------------------------------------------------------- instance generation

_INSTANCE_FIELD = re.compile(
    r"^[ \t]*(?:[-*][ \t]*)?(?:\*\*|__)?[ \t]*(class[ \t]*label|label|input|output)[ \t]*(?:\*\*|__)?[ \t]*:"
    r"(?:[ \t]*(?:\*\*|__))?[ \t]*",
    re.I | re.M,
)
_EXAMPLE_HEADER = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?example\s*\d*\s*:?\s*(?:\*\*)?\s*$", re.I | re.M)


def parse_instances(text: str, output_first: bool, truncated: bool = False) -> Parsed:
    """Instances from JSON (`{"instances": [...]}`) or from `Input:/Output:` (`Class label:/Input:`) blocks.

    Input-first: an `Input:` opens an instance and the next `Output:` closes it (an `Output:` alone means no
    input). Output-first: a `Class label:` opens an instance (the label is its output) and the next `Input:`
    fills its input. A truncated answer loses its last instance.
    """
    body = _unfence(text)
    value, ok = _json_values(body)
    items: list[Any] | None = _list_in(value, ("instances", "examples")) if ok else None
    if items is None and body.lstrip().startswith(("{", "[")) and not _INSTANCE_FIELD.search(body):
        salvaged, found = _salvage_array(
            body.lstrip(), "instances" if body.lstrip().startswith("{") else None
        )
        if found:
            if truncated:
                items = salvaged
            else:
                parsed = _instance_items(salvaged, output_first)
                parsed.unparseable += 1
                return parsed
    if items is not None:
        return _instance_items(items, output_first)
    return _instance_blocks(body, output_first, truncated)


def _instance_items(items: list[Any], output_first: bool) -> Parsed:
    out = Parsed()
    out_key = "label" if output_first else "output"
    for item in items:
        if isinstance(item, dict):
            output = item.get(out_key, item.get("output"))
            raw_input = item.get("input", "")
            if isinstance(output, str) and isinstance(raw_input, str):
                out.items.append(Instance(_clean_input(raw_input), output.strip()))
                continue
        out.unparseable += 1
    return out


def _instance_blocks(text: str, output_first: bool, truncated: bool) -> Parsed:
    text = _EXAMPLE_HEADER.sub("", text)
    opener = "label" if output_first else "input"
    drafts: list[dict[str, str]] = []
    marks = list(_INSTANCE_FIELD.finditer(text))
    for i, m in enumerate(marks):
        name = _WS.sub("", m.group(1).lower()).replace("classlabel", "label")
        if output_first and name == "output":
            name = "label"
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        value = text[m.end() : end].strip()
        if name == opener or not drafts or name in drafts[-1]:
            drafts.append({})
        drafts[-1][name] = value
    if truncated and drafts:
        drafts.pop()
    out = Parsed()
    closer = "label" if output_first else "output"
    for d in drafts:
        if closer in d:
            out.items.append(Instance(_clean_input(d.get("input", "")), d[closer]))
        else:
            out.unparseable += 1
    if not marks and text.strip():
        out.unparseable += 1
    return out
