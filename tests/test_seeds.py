"""Seed and corpus loaders: good files load, every malformed file is one `file:line: ...` error."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from selfinstruct.corpus import (
    load_alpaca,
    load_corpus_any,
    load_seed_tasks,
    load_tasks_any,
    read_json_records,
    seed_corpus,
)
from selfinstruct.errors import InputFileError
from selfinstruct.filters.heuristics import FilterConfig, build_heuristics
from selfinstruct.filters.rouge import NoveltyIndex

REPO = Path(__file__).resolve().parents[1]

GOOD_SEED = {
    "id": "t1",
    "name": "add",
    "instruction": "Add the two numbers.",
    "instances": [{"input": "2 and 3", "output": "5"}],
    "is_classification": False,
}


def write_lines(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def test_seed_jsonl_loads(tmp_path):
    other = dict(GOOD_SEED, id="t2", is_classification=True, category="math")
    tasks = load_seed_tasks(write_lines(tmp_path / "s.jsonl", [GOOD_SEED, other]))
    assert [t.id for t in tasks] == ["t1", "t2"]
    assert tasks[0].instances[0].output == "5"
    assert tasks[1].is_classification and tasks[1].category == "math"


def test_alpaca_json_array_and_jsonl_load(tmp_path):
    recs = [
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Echo it.", "output": "x"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    write_lines(tmp_path / "a.jsonl", recs)
    for name in ("a.json", "a.jsonl"):
        loaded = load_alpaca(tmp_path / name)
        assert [r.instruction for r in loaded] == ["Say hi.", "Echo it."]
        assert loaded[1].input == ""
    tasks = load_tasks_any(tmp_path / "a.json")
    assert [t.id for t in tasks] == ["a_0", "a_1"] and tasks[0].instances[0].output == "Hi"


def test_json_array_records_keep_their_line_numbers(tmp_path):
    (tmp_path / "a.json").write_text(
        '[\n  {"instruction": "A b c d", "output": "x"},\n\n  {"instruction": 5}\n]\n'
    )
    assert [n for n, _ in read_json_records(tmp_path / "a.json")] == [2, 4]
    with pytest.raises(InputFileError, match=r"a.json:4: field 'instruction'"):
        load_alpaca(tmp_path / "a.json")


MALFORMED = [
    # (file name, bytes, loader, expected message fragment)
    ("empty.jsonl", b"", load_seed_tasks, r"empty.jsonl: file is empty"),
    ("blank.jsonl", b"\n  \n", load_seed_tasks, r"blank.jsonl: file is empty"),
    ("badjson.jsonl", b'{"id": "a"}\n{"id": \n', load_seed_tasks, r"badjson.jsonl:2: invalid JSON"),
    ("notobj.jsonl", b"[1, 2]\n", load_seed_tasks, r"notobj.jsonl:1: expected a JSON object, got int"),
    ("list.jsonl", b'"just a string"\n', load_seed_tasks, r"list.jsonl:1: expected a JSON object, got str"),
    (
        "latin1.jsonl",
        b'{"id": "a"}\n{"id": "caf\xe9"}\n',
        load_seed_tasks,
        r"latin1.jsonl:2: not valid UTF-8",
    ),
    (
        "noinst.jsonl",
        json.dumps({"id": "a", "instruction": "Do it now."}).encode(),
        load_seed_tasks,
        r"noinst.jsonl:1: field 'instances': missing required field",
    ),
    (
        "emptyinst.jsonl",
        json.dumps(dict(GOOD_SEED, instances=[])).encode(),
        load_seed_tasks,
        r"emptyinst.jsonl:1: field 'instances'",
    ),
    (
        "intid.jsonl",
        json.dumps(dict(GOOD_SEED, id=7)).encode(),
        load_seed_tasks,
        r"intid.jsonl:1: field 'id'",
    ),
    (
        "badout.jsonl",
        json.dumps(dict(GOOD_SEED, instances=[{"input": "", "output": 3}])).encode(),
        load_seed_tasks,
        r"badout.jsonl:1: field 'instances.0.output'",
    ),
    (
        "badcls.jsonl",
        json.dumps(dict(GOOD_SEED, is_classification="yes")).encode(),
        load_seed_tasks,
        r"badcls.jsonl:1: field 'is_classification'",
    ),
    (
        "blankinstr.jsonl",
        json.dumps(dict(GOOD_SEED, instruction="   ")).encode(),
        load_seed_tasks,
        r"blankinstr.jsonl:1: field 'instruction': is empty",
    ),
    (
        "dup.jsonl",
        (json.dumps(GOOD_SEED) + "\n\n" + json.dumps(GOOD_SEED) + "\n").encode(),
        load_seed_tasks,
        r"dup.jsonl:3: duplicate id 't1' \(first on line 1\)",
    ),
    (
        "nooutput.jsonl",
        b'{"instruction": "Say hi to me."}\n',
        load_alpaca,
        r"nooutput.jsonl:1: field 'output'",
    ),
    (
        "unterminated.json",
        b'[{"instruction": "a b c d", "output": "x"},\n',
        load_alpaca,
        r"unterminated.json:2: invalid JSON: unterminated array",
    ),
    (
        "trailing.json",
        b'[{"instruction": "a b c d", "output": "x"}] x',
        load_alpaca,
        r"trailing.json:1: invalid JSON: extra",
    ),
    (
        "nocomma.json",
        b'[{"instruction": "a b c d", "output": "x"}\n{"instruction": "e"}]',
        load_alpaca,
        r"nocomma.json:2: invalid JSON: expected ','",
    ),
    ("emptyarr.json", b"[]", load_alpaca, r"emptyarr.json: no records"),
]


@pytest.mark.parametrize(("name", "data", "loader", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_give_file_line_errors(tmp_path, name, data, loader, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputFileError, match=message):
        loader(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputFileError, match=r"nope\.jsonl: file not found"):
        load_seed_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(InputFileError, match="is a directory"):
        load_seed_tasks(tmp_path)


# ---------------------------------------------------------------- our own seed set

SEEDS = REPO / "seeds" / "seed_tasks.jsonl"


def test_seed_set_loads_with_the_promised_shape():
    tasks = load_seed_tasks(SEEDS)
    assert len(tasks) >= 175
    assert len({t.id for t in tasks}) == len(tasks) and len({t.name for t in tasks}) == len(tasks)
    assert sum(t.is_classification for t in tasks) >= 25
    assert all(t.instances and all(i.output.strip() for i in t.instances) for t in tasks)
    categories = Counter(t.category for t in tasks)
    assert None not in categories and len(categories) >= 15
    with_input = sum(bool(t.instances[0].input) for t in tasks) / len(tasks)
    assert 0.35 <= with_input <= 0.45


def test_seed_classification_outputs_are_short_labels():
    for t in load_seed_tasks(SEEDS):
        if t.is_classification:
            assert all(len(i.output.split()) <= 4 for i in t.instances), t.id


def test_seed_readme_counts_match_the_file():
    tasks = load_seed_tasks(SEEDS)
    readme = (REPO / "seeds" / "README.md").read_text()
    for category, n in Counter(t.category for t in tasks).items():
        assert re.search(rf"\|\s*{category}\s*\|\s*{n}\s*\|", readme), category
    assert f"{len(tasks)} " in readme


def test_seeds_pass_our_own_filters():
    """Seeds must survive the filters generated instructions face, or the pool would reject its own examples."""
    tasks = load_seed_tasks(SEEDS)
    heuristics = build_heuristics(FilterConfig())
    assert {t.id: heuristics(t.instruction) for t in tasks if heuristics(t.instruction)} == {}
    kept = NoveltyIndex().query([t.instruction for t in tasks])
    assert all(r.keep for r in kept)  # no seed is a ROUGE-L near-duplicate (> 0.7) of an earlier one


def test_seed_corpus_one_record_per_instance(tmp_path):
    tasks = load_seed_tasks(SEEDS)
    records = load_corpus_any(SEEDS)
    assert len(records) == sum(len(t.instances) for t in tasks)
    assert records[0].meta == {
        "task_id": tasks[0].id,
        "is_classification": tasks[0].is_classification,
        "origin": "seed",
        "category": tasks[0].category,
    }
    write_lines(tmp_path / "a.jsonl", [{"instruction": "Say hi now.", "output": "Hi"}])
    assert [r.output for r in load_corpus_any(tmp_path / "a.jsonl")] == ["Hi"]


def test_alpaca_records_of_one_task_become_one_seed_task(tmp_path):
    """A split or export of the seeds turns back into the same tasks, label-ness and category included."""
    tasks = load_seed_tasks(SEEDS)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in seed_corpus(tasks)))
    assert load_tasks_any(path) == [replace(t, name=t.id) for t in tasks]  # names are not in the corpus
