"""Parsers for every stage: structured JSON, the tolerant fallbacks, truncation, and what counts as unparseable."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfinstruct.parsing import (
    CLASSIFY_SCHEMA,
    TaskDraft,
    instances_schema,
    instructions_schema,
    parse_continued_list,
    parse_instances,
    parse_instruction_list,
    parse_tasks,
    parse_yes_no,
    tasks_schema,
)
from selfinstruct.records import Instance

ITEMS = [
    "Write a haiku about autumn rain.",
    "List three uses of baking soda.",
    "Explain recursion to a child.",
]


# ---------------------------------------------------------------- bootstrap, base model


def test_continued_list_finishes_the_open_item_and_splits_the_rest():
    text = " Sort the numbers   in\n ascending order.\n10. Name a   river in Peru.\n11. Define entropy.\n"
    assert parse_continued_list(text) == [
        "Sort the numbers in ascending order.",
        "Name a river in Peru.",
        "Define entropy.",
    ]


def test_continued_list_drops_empty_items():
    assert parse_continued_list(" \n10. \n11. Define entropy.") == ["Define entropy."]


# ---------------------------------------------------------------- bootstrap, chat


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"instructions": ITEMS}),
        json.dumps(ITEMS),
        "```json\n" + json.dumps({"instructions": ITEMS}, indent=2) + "\n```",
        "Sure! Here are the tasks:\n```\n" + json.dumps(ITEMS) + "\n```\nEnjoy.",
        json.dumps({"tasks": [{"instruction": t} for t in ITEMS]}),
        "\n".join(f"{k}. {t}" for k, t in enumerate(ITEMS, 1)),
        "\n".join(f"{k}) {t}" for k, t in enumerate(ITEMS, 1)),
        "\n".join(f"Task {k}: {t}" for k, t in enumerate(ITEMS, 1)),
        "\n".join(f"**Task {k}:** {t}" for k, t in enumerate(ITEMS, 1)),
        "\n".join(f"**{k}.** {t}" for k, t in enumerate(ITEMS, 1)),
        "\n".join(f"- {t}" for t in ITEMS),
        "\n".join(f"* **Instruction:** {t}" for t in ITEMS),
        "\n".join(f"• {t}" for t in ITEMS),
        "Here are 3 new tasks:\n\n"
        + "\n".join(f"{k}. {t}" for k, t in enumerate(ITEMS, 1))
        + "\n\nHope this helps!",
        "\n".join(f'{k}. "{t}"' for k, t in enumerate(ITEMS, 1)),
        "### 1. Write a haiku about autumn rain.\n### 2. List three uses of baking soda.\n### 3. Explain recursion to a child.",
    ],
)
def test_instruction_list_variants(text):
    parsed = parse_instruction_list(text)
    assert parsed.items == ITEMS
    assert parsed.unparseable == 0


def test_instruction_list_joins_continuation_lines():
    text = "1. Write a haiku\n   about autumn rain.\n2. List three uses of baking soda."
    assert parse_instruction_list(text).items == [
        "Write a haiku about autumn rain.",
        "List three uses of baking soda.",
    ]


def test_brackets_inside_prose_are_not_mistaken_for_json():
    text = "1. Sort the list [3, 1, 2] in ascending order.\n2. Explain what {x: 1} means in Python."
    assert parse_instruction_list(text).items == [
        "Sort the list [3, 1, 2] in ascending order.",
        "Explain what {x: 1} means in Python.",
    ]


def test_truncated_json_keeps_complete_strings():
    full = json.dumps({"instructions": ITEMS})
    cut = full[: full.index(ITEMS[2]) + 5]
    parsed = parse_instruction_list(cut, truncated=True)
    assert parsed.items == ITEMS[:2] and parsed.unparseable == 0


def test_broken_json_that_was_not_truncated_counts_as_unparseable():
    parsed = parse_instruction_list('{"instructions": ["Write a haiku about autumn rain.", oops]}')
    assert parsed.items == ["Write a haiku about autumn rain."]
    assert parsed.unparseable == 1


def test_truncated_prose_list_drops_the_last_item():
    text = "\n".join(f"{k}. {t}" for k, t in enumerate(ITEMS, 1))
    assert parse_instruction_list(text, truncated=True).items == ITEMS[:2]


def test_garbage_and_bad_items_are_counted():
    assert parse_instruction_list("#$%&*@!?~^ ,.;:").unparseable == 1
    assert parse_instruction_list("").unparseable == 1
    parsed = parse_instruction_list(
        json.dumps({"instructions": ["Write a haiku about rain.", 3, "", {"x": 1}]})
    )
    assert parsed.items == ["Write a haiku about rain."] and parsed.unparseable == 3


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parsers_never_raise(text):
    for truncated in (False, True):
        parse_instruction_list(text, truncated)
        parse_tasks(text, truncated)
        parse_instances(text, True, truncated)
        parse_instances(text, False, truncated)
    parse_continued_list(text)
    parse_yes_no(text)


# ---------------------------------------------------------------- Alpaca tasks


TASKS = [
    TaskDraft("Give three tips for staying healthy.", "", "Eat well, sleep enough and move every day."),
    TaskDraft("Translate the sentence into French.", "Good morning, everyone.", "Bonjour à tous."),
]


def test_tasks_from_json_and_noinput():
    data = {
        "tasks": [
            {"instruction": t.instruction, "input": t.input or "<noinput>", "output": t.output} for t in TASKS
        ]
    }
    parsed = parse_tasks(json.dumps(data))
    assert parsed.items == TASKS and parsed.unparseable == 0


def test_tasks_from_numbered_blocks():
    text = (
        "4. Instruction: Give three tips for staying healthy.\n4. Input:\n<noinput>\n4. Output:\n"
        "Eat well, sleep enough and move every day.\n###\n"
        "5. Instruction: Translate the sentence into French.\n5. Input:\nGood morning, everyone.\n5. Output:\n"
        "Bonjour à tous.\n###\n"
    )
    parsed = parse_tasks(text)
    assert parsed.items == TASKS and parsed.unparseable == 0


def test_tasks_from_bold_markdown_blocks():
    text = (
        "**Instruction:** Give three tips for staying healthy.\n**Input:** <noinput>\n"
        "**Output:** Eat well, sleep enough and move every day.\n\n---\n\n"
        "**Instruction:** Translate the sentence into French.\n**Input:** Good morning, everyone.\n"
        "**Output:** Bonjour à tous."
    )
    assert parse_tasks(text).items == TASKS


def test_truncated_task_list_loses_only_its_last_task():
    text = (
        "1. Instruction: Give three tips for staying healthy.\n1. Input:\n<noinput>\n1. Output:\n"
        "Eat well, sleep enough and move every day.\n###\n2. Instruction: Translate the sentence into French.\n"
        "2. Input:\nGood morning, everyone.\n2. Output:\nBonj"
    )
    assert parse_tasks(text, truncated=True).items == TASKS[:1]
    full = json.dumps({"tasks": [vars(t) for t in TASKS]})
    assert parse_tasks(full[:-30], truncated=True).items == TASKS[:1]


def test_task_without_output_is_unparseable():
    parsed = parse_tasks(
        "1. Instruction: Name a planet.\n1. Input:\n<noinput>\n###\n2. Instruction: x\n2. Output:\ny"
    )
    assert parsed.items == [TaskDraft("x", "", "y")] and parsed.unparseable == 1


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"is_classification": true}', True),
        ('{"is_classification":false}', False),
        (" Yes", True),
        ("No.", False),
        ("**Yes**, it is.", True),
        ("Answer: no", False),
        ("true", True),
        ("Maybe", None),
        ("", None),
    ],
)
def test_yes_no(text, expected):
    assert parse_yes_no(text) is expected


# ---------------------------------------------------------------- instances


def test_input_first_blocks_with_and_without_input():
    text = "\nExample 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nOutput: Any even number.\n\nExample 3\nInput: 3 * 3\nOutput: 9"
    parsed = parse_instances(text, output_first=False)
    assert parsed.items == [Instance("2 + 2", "4"), Instance("", "Any even number."), Instance("3 * 3", "9")]


def test_output_first_blocks():
    text = "Class label: Positive\nInput: I loved it.\n\nClass label: Negative\nInput: Never again.\n\nClass label: Neutral"
    parsed = parse_instances(text, output_first=True)
    assert parsed.items == [
        Instance("I loved it.", "Positive"),
        Instance("Never again.", "Negative"),
        Instance("", "Neutral"),
    ]


def test_instances_from_json_and_truncation():
    items = [{"input": "2 + 2", "output": "4"}, {"input": "", "output": "Any even number."}]
    assert parse_instances(json.dumps({"instances": items}), False).items == [
        Instance("2 + 2", "4"),
        Instance("", "Any even number."),
    ]
    labelled = [{"label": "Spam", "input": "WIN A PRIZE"}, {"label": "Not spam", "input": "Lunch at 1?"}]
    assert parse_instances(json.dumps({"instances": labelled}), True).items[0] == Instance(
        "WIN A PRIZE", "Spam"
    )
    cut = json.dumps({"instances": items})[:-25]
    assert parse_instances(cut, False, truncated=True).items == [Instance("2 + 2", "4")]
    text = "Example 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nInput: 3 * 3\nOutput: 9 and"
    assert parse_instances(text, False, truncated=True).items == [Instance("2 + 2", "4")]


def test_instance_without_output_is_unparseable():
    parsed = parse_instances("Input: 2 + 2\n\nInput: 3 * 3\nOutput: 9", output_first=False)
    assert parsed.items == [Instance("3 * 3", "9")] and parsed.unparseable == 1
    assert parse_instances("no structure at all", output_first=False).unparseable == 1


# ---------------------------------------------------------------- schemas


def test_schemas_accept_what_the_parsers_read():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate({"instructions": ITEMS}, instructions_schema(7))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"instructions": ITEMS * 3}, instructions_schema(7))
    jsonschema.validate({"tasks": [vars(t) for t in TASKS]}, tasks_schema(20))
    jsonschema.validate({"is_classification": True}, CLASSIFY_SCHEMA)
    jsonschema.validate(
        {"instances": [{"label": "Spam", "input": ""}]}, instances_schema(5, output_first=True)
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"instances": [{"input": "", "output": "x", "extra": 1}]}, instances_schema(5, False)
        )


def test_schemas_cap_string_lengths_only_when_asked():
    def strings(schema):
        if schema.get("type") == "string":
            yield schema
        for value in schema.values():
            if isinstance(value, dict):
                yield from strings(value)

    for make in (
        lambda c: instructions_schema(5, c),
        lambda c: tasks_schema(5, c),
        lambda c: instances_schema(3, True, c),
        lambda c: instances_schema(3, False, c),
    ):
        assert all("maxLength" not in s for s in strings(make(None)))  # OpenAI strict mode rejects it
        capped = list(strings(make(200)))
        assert capped and all(s["maxLength"] == 200 for s in capped)
