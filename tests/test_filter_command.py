"""`selfinstruct filter`: output files, input order, the pool, stage selection, --force, and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.store import read_jsonl

RECORDS = [
    {"instruction": "Write a short poem about the sea.", "input": "", "output": "Waves."},
    {"instruction": "Write a short poem about the sea!", "input": "", "output": "More waves."},
    {"instruction": "Draw a map of the old city.", "input": "", "output": "No."},
    {"instruction": "Hi there", "input": "", "output": "Hello."},
    {
        "instruction": "Explain how photosynthesis works in plants.",
        "input": "",
        "output": "Light.",
        "meta": {"k": 1},
    },
    {"instruction": "List three animals that can fly.", "input": "", "output": "Birds, bats, bees."},
    {"instruction": "List three animals that can fly.", "input": "zoo", "output": "Owls."},
]
SEEDS = [
    {
        "id": "seed_task_0",
        "name": "photosynthesis",
        "instruction": "Explain how photosynthesis works in green plants.",
        "instances": [{"input": "", "output": "Chlorophyll..."}],
        "is_classification": False,
    }
]


def write_json(path: Path, records, jsonl=False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(["filter", *map(str, args)])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_filter_writes_kept_rejected_and_summary_in_input_order(tmp_path, capsys):
    corpus = write_json(tmp_path / "corpus.json", RECORDS)
    seeds = write_json(tmp_path / "seeds.jsonl", SEEDS, jsonl=True)
    code, out, err = run(capsys, corpus, "--out", tmp_path / "o", "--pool", seeds, "--batch-size", 2)
    assert code == 0, err
    kept = list(read_jsonl(tmp_path / "o" / "kept.jsonl"))
    rejected = list(read_jsonl(tmp_path / "o" / "rejected.jsonl"))
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())

    # RECORDS[5] and [6] are two instances of one task (same instruction): judged once, kept together
    assert [k["instruction"] for k in kept] == [RECORDS[i]["instruction"] for i in (0, 5, 6)]
    assert kept[2]["input"] == "zoo" and kept[2]["meta"] == kept[1]["meta"]
    first = kept[0]
    assert {k: v for k, v in first.items() if k != "meta"} == RECORDS[0]  # the record itself is unchanged
    assert first["meta"]["max_similarity"] < 0.7 and isinstance(first["meta"]["most_similar"], dict)
    starts = [n for n, line in enumerate(corpus.read_text().splitlines(), 1) if line == "  {"]  # record lines
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (starts[1], "too_similar"),
        (starts[2], "blacklisted:draw"),
        (starts[3], "too_short"),
        (starts[4], "too_similar"),
    ]
    assert rejected[0]["nearest"] == RECORDS[0]["instruction"] and rejected[0]["similarity"] == 1.0
    assert rejected[3]["nearest"] == SEEDS[0]["instruction"] and rejected[3]["record"] == RECORDS[4]
    assert rejected[1]["nearest"] is None and rejected[1]["record"] == RECORDS[2]
    assert summary["records"] == 7 and summary["tasks"] == 6 and summary["kept"] == 3
    assert summary["pool_size"] == 1 and summary["rejected_by_reason"] == dict(
        Counter(r["reason"] for r in rejected)
    )
    assert "too_similar" in out and "3 kept, 4 rejected" in out


def test_stage_selection_and_seed_input(tmp_path, capsys):
    corpus = write_json(tmp_path / "corpus.jsonl", RECORDS, jsonl=True)
    code, _, err = run(
        capsys, corpus, "--out", tmp_path / "rouge", "--filters", "rouge", "--threshold", "0.5"
    )
    assert code == 0, err
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "rouge" / "rejected.jsonl")]
    assert reasons == ["too_similar"]  # the rules did not run: "Draw ..." and "Hi there" stay
    code, _, err = run(capsys, corpus, "--out", tmp_path / "rules", "--filters", "heuristics")
    assert code == 0, err
    kept = list(read_jsonl(tmp_path / "rules" / "kept.jsonl"))
    assert kept[0] == RECORDS[0] and len(kept) == 5  # no similarity metadata without the rouge stage
    # A seed file is a corpus too; the default output directory sits next to it.
    seeds = write_json(tmp_path / "seeds.jsonl", SEEDS * 2, jsonl=True)
    code, _, err = run(capsys, seeds)
    assert code == 0, err
    assert [r["reason"] for r in read_jsonl(tmp_path / "seeds-filtered" / "rejected.jsonl")] == ["duplicate"]


def test_existing_outputs_need_force(tmp_path, capsys):
    corpus = write_json(tmp_path / "corpus.json", RECORDS)
    assert run(capsys, corpus, "--out", tmp_path / "o")[0] == 0
    first = (tmp_path / "o" / "kept.jsonl").read_text()
    code, _, err = run(capsys, corpus, "--out", tmp_path / "o")
    assert code == 2 and "kept.jsonl: already exists (use --force to overwrite)" in err
    code, _, err = run(capsys, corpus, "--out", tmp_path / "o", "--force")
    assert code == 0, err
    assert (tmp_path / "o" / "kept.jsonl").read_text() == first  # replaced, not appended


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"instruction": "Name a color."}\n{"instruction": \n', [], "corpus.jsonl:2: invalid JSON"),
        (
            '{"instruction": "Name a color."}\n{"output": "x"}\n',
            [],
            "corpus.jsonl:2: field 'instruction': missing",
        ),
        (
            '{"instruction": "Name a color.", "meta": 3}\n',
            [],
            "corpus.jsonl:1: field 'meta': must be an object",
        ),
        (
            '{"instruction": "Name a color."}\n',
            ["--field", "output"],
            "corpus.jsonl:1: field 'output': missing",
        ),
        ('{"instruction": "Name a color."}\n', ["--pool", "nope.jsonl"], "nope.jsonl: file not found"),
        ('{"instruction": "Name a color."}\n', ["--filters", "rouge,spell"], "invalid setting stages"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, content, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "corpus.jsonl", "--out", "o", *args)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_input_is_a_clear_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "give a corpus file" in err
