"""`selfinstruct templatize`: golden renderings, the shipped templates on the shipped example datasets, every
source format, determinism, the per-task cap and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.corpus import load_corpus_any
from selfinstruct.errors import UserError
from selfinstruct.templatize import (
    FLAN_DIR,
    TemplatizeConfig,
    load_template_file,
    read_rows,
    templatize,
    templatize_rows,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "seeds" / "flan_examples"

# shipped template -> (example dataset, extra --column mappings)
SHIPPED = {
    "sentiment": ("sentiment.jsonl", []),
    "topic": ("topic.csv", []),
    "nli": ("nli.csv", []),
    "paraphrase": ("paraphrase.jsonl", []),
    "extractive_qa": ("squad_style.json", ["answer=answers.text.0"]),
    "summarization": ("summaries.jsonl", []),
}

GOLDEN_YAML = """\
task: weather
cluster: weather_cls
answer_choices: [dry, wet]
templates:
  - id: sky
    template: |
      Sky: {{ sky }}
      Will it rain?
      |||
      {{ answer_choices[label] }}
"""

ROWS = [{"sky": "grey clouds", "label": 1}, {"sky": "clear blue", "label": 0}]


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _spec(tmp_path: Path, text: str = GOLDEN_YAML):
    return load_template_file(str(_write(tmp_path / "t.yaml", text)))


# ---------------------------------------------------------------- golden renderings


def test_golden_zero_shot_without_and_with_options(tmp_path: Path):
    spec = _spec(tmp_path)
    plain = templatize_rows(spec, ROWS, options_ratio=0.0)
    assert [r.to_dict() for r in plain] == [
        {
            "instruction": "Sky: grey clouds\nWill it rain?",
            "input": "",
            "output": "wet",
            "meta": {
                "task": "weather",
                "cluster": "weather_cls",
                "template_id": "sky",
                "shots": 0,
                "options": False,
                "source_row": 0,
                "category": "weather_cls",
                "task_id": "weather",
                "is_classification": True,
            },
        },
        {
            "instruction": "Sky: clear blue\nWill it rain?",
            "input": "",
            "output": "dry",
            "meta": {
                "task": "weather",
                "cluster": "weather_cls",
                "template_id": "sky",
                "shots": 0,
                "options": False,
                "source_row": 1,
                "category": "weather_cls",
                "task_id": "weather",
                "is_classification": True,
            },
        },
    ]
    with_options = templatize_rows(spec, ROWS, options_ratio=1.0)
    assert with_options[0].instruction == "Sky: grey clouds\nWill it rain?\n\nOPTIONS:\n- dry\n- wet"
    assert with_options[0].meta["options"] is True


def test_golden_options_placed_by_the_template(tmp_path: Path):
    spec = _spec(tmp_path, GOLDEN_YAML.replace("Will it rain?", "{{ options }}\n      Will it rain?"))
    [first, _] = templatize_rows(spec, ROWS, options_ratio=1.0)
    assert first.instruction == "Sky: grey clouds\nOPTIONS:\n- dry\n- wet\nWill it rain?"
    [first, _] = templatize_rows(spec, ROWS, options_ratio=0.0)
    assert first.instruction == "Sky: grey clouds\n\nWill it rain?"


def test_golden_few_shot(tmp_path: Path):
    spec = _spec(tmp_path)
    first, second = templatize_rows(spec, ROWS, shots=(1, 1), options_ratio=0.0)
    assert first.instruction == (
        "Sky: clear blue\nWill it rain?\ndry\n\nSky: grey clouds\nWill it rain?"
    )  # fmt: skip
    assert first.output == "wet"
    assert second.instruction == "Sky: grey clouds\nWill it rain?\nwet\n\nSky: clear blue\nWill it rain?"
    assert (first.meta["shots"], second.meta["shots"]) == (1, 1)
    with_options = templatize_rows(spec, ROWS, shots=(1, 1), options_ratio=1.0)
    assert with_options[0].instruction == (
        "Sky: clear blue\nWill it rain?\n\nOPTIONS:\n- dry\n- wet\ndry\n\n"
        "Sky: grey clouds\nWill it rain?\n\nOPTIONS:\n- dry\n- wet"
    )


def test_few_shot_examples_come_from_other_rows(tmp_path: Path):
    spec = _spec(tmp_path)
    rows = [{"sky": f"sky number {i}", "label": i % 2} for i in range(30)]
    records = templatize_rows(spec, rows, shots=(0, 3), options_ratio=0.0, seed=3)
    assert {r.meta["shots"] for r in records} == {0, 1, 2, 3}
    for r in records:
        blocks = r.instruction.split("\n\n")
        assert len(blocks) == r.meta["shots"] + 1
        assert blocks[-1] == f"Sky: sky number {r.meta['source_row']}\nWill it rain?"
        assert all(f"sky number {r.meta['source_row']}\n" not in b for b in blocks[:-1])


def test_answer_choices_from_a_column_and_the_options_share(tmp_path: Path):
    spec = _spec(
        tmp_path, GOLDEN_YAML.replace("answer_choices: [dry, wet]", "answer_choices: {column: choices}")
    )
    rows = [
        {"sky": f"s{i}", "label": i % 3, "choices": ["sun", "rain", "snow"][: 2 + i % 2 + 1]}
        for i in range(400)
    ]
    rows = [r for r in rows if r["label"] < len(r["choices"])]
    records = templatize_rows(spec, rows, options_ratio=0.25, seed=2)
    for r in records:
        choices = rows[r.meta["source_row"]]["choices"]
        assert r.output == choices[rows[r.meta["source_row"]]["label"]]
        if r.meta["options"]:
            assert r.instruction.endswith("OPTIONS:" + "".join(f"\n- {c}" for c in choices))
        else:
            assert "OPTIONS:" not in r.instruction
    share = sum(r.meta["options"] for r in records) / len(records)
    assert 0.18 < share < 0.32
    with pytest.raises(
        UserError, match=r"answer_choices column 'choices' not in source \(available columns: label, sky\)"
    ):
        templatize_rows(spec, ROWS)
    with pytest.raises(UserError, match="row 0: answer_choices column 'choices' must hold a non-empty list"):
        templatize_rows(spec, [{"sky": "x", "label": 0, "choices": []}])


# ---------------------------------------------------------------- shipped templates


def test_at_least_six_shipped_templates_with_several_templates_each():
    names = sorted(p.stem for p in FLAN_DIR.glob("*.yaml"))
    assert names == sorted(SHIPPED)
    for name in names:
        spec = load_template_file(name)
        assert len(spec.templates) >= 4, name
        assert any(t.reverse for t in spec.templates), name


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_templates_render_the_example_datasets(name: str):
    data, columns = SHIPPED[name]
    spec = load_template_file(name)
    rows = read_rows(str(EXAMPLES / data))
    overrides = dict(c.split("=") for c in columns)
    records = templatize_rows(spec, rows, overrides=overrides, shots=(0, 2), options_ratio=0.5, seed=1)
    assert len(records) == len(rows)
    assert {r.meta["source_row"] for r in records} == set(range(len(rows)))
    for r in records:
        assert r.instruction.strip() and r.output.strip()
        assert r.meta["category"] == r.meta["cluster"] == spec.cluster
        if r.meta["is_classification"]:
            assert r.output in spec.choices
        else:
            assert not r.meta["options"]
    # every template is usable on this data
    for seed in range(8):
        records += templatize_rows(spec, rows, overrides=overrides, seed=seed)
    assert {r.meta["template_id"] for r in records} == {t.id for t in spec.templates}


def test_only_if_limits_reversed_templates_to_matching_rows():
    spec = load_template_file("paraphrase")
    rows = read_rows(str(EXAMPLES / "paraphrase.jsonl"))
    records = [r for seed in range(6) for r in templatize_rows(spec, rows, seed=seed)]
    reversed_rows = {
        r.meta["source_row"] for r in records if r.meta["template_id"] in ("rephrase", "rewrite")
    }
    assert reversed_rows and all(rows[i]["label"] == 1 for i in reversed_rows)


# ---------------------------------------------------------------- sources, CLI, determinism, cap


def _run(*args: str) -> int:
    try:
        return cli.run(list(args))
    except UserError:
        return 2


def test_cli_output_is_byte_identical_under_a_seed(tmp_path: Path):
    src = str(EXAMPLES / "sentiment.jsonl")
    common = ["templatize", src, "--template", "sentiment", "--shots", "0-3", "--max-per-task", "15"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert cli.run([*common, "--seed", seed, "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    records = load_corpus_any(tmp_path / "a.jsonl")
    assert len(records) == 15
    assert len({r.meta["source_row"] for r in records}) == 15


def test_cap_is_never_exceeded(tmp_path: Path):
    spec = _spec(tmp_path)
    rows = [{"sky": f"s{i}", "label": i % 2} for i in range(50)]
    for cap in (1, 7, 49, 50, 80):
        records = templatize_rows(spec, rows, max_per_task=cap, seed=cap)
        assert len(records) == min(cap, 50)
        rows_used = [r.meta["source_row"] for r in records]
        assert rows_used == sorted(set(rows_used))


def test_csv_parquet_and_hf_directory_give_the_same_records(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(str(EXAMPLES / "sentiment.jsonl"))
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(
        "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows), encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "train.jsonl").write_bytes((EXAMPLES / "sentiment.jsonl").read_bytes())
    outs = []
    for source in (EXAMPLES / "sentiment.jsonl", csv_path, tmp_path / "s.parquet", hf_dir):
        out = tmp_path / f"out-{len(outs)}.jsonl"
        cfg = TemplatizeConfig(source=str(source), template="sentiment", out=str(out), shots="0-1", seed=4)
        assert templatize(cfg)["records"] == len(rows)
        outs.append(out.read_bytes())
    assert len(set(outs)) == 1


def test_hugging_face_sources_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A data directory with named configs and splits (--subset/--split), the same dataset by its hub name from
    the datasets cache with no network, and directories written by save_to_disk: all give the JSONL's records."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    reference = tmp_path / "reference.jsonl"
    jsonl = EXAMPLES / "sentiment.jsonl"
    run_args = ["--template", "sentiment", "--shots", "0-2", "--seed", "5"]
    assert cli.run(["templatize", str(jsonl), *run_args, "--out", str(reference)]) == 0
    rows = read_rows(str(jsonl))

    repo = tmp_path / "hub" / "reviews"  # laid out like a script-free hub repository
    for config, split, data in (
        ("full", "validation", rows),
        ("full", "train", rows[:3]),
        ("tiny", "train", rows[:1]),
    ):
        (repo / config).mkdir(parents=True, exist_ok=True)
        (repo / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: full\n  data_files:\n  - {split: train, path: full/train.jsonl}\n"
        "  - {split: validation, path: full/validation.jsonl}\n"
        "- config_name: tiny\n  data_files:\n  - {split: train, path: tiny/train.jsonl}\n---\n"
    )
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    hf_args = ["--subset", "full", "--split", "validation"]
    sources = [
        [str(repo), *hf_args],
        [str(tmp_path / "saved")],
        [str(tmp_path / "saved_dict"), "--split", "validation"],
    ]
    for n, source in enumerate(sources):
        out = tmp_path / f"hf-{n}.jsonl"
        assert cli.run(["templatize", *source, *run_args, "--out", str(out)]) == 0
        assert out.read_bytes() == reference.read_bytes(), source
    assert len(read_rows(str(repo), "tiny", "train")) == 1

    # the hub name, offline: `load_dataset` finds what a download left in the cache under OWNER___NAME
    (tmp_path / "cache" / "reviews").rename(tmp_path / "cache" / "toyorg___reviews")
    out = tmp_path / "hf-cache.jsonl"
    assert cli.run(["templatize", "toyorg/reviews", *hf_args, *run_args, "--out", str(out)]) == 0
    assert out.read_bytes() == reference.read_bytes()

    with pytest.raises(UserError, match=r"saved_dict: no split 'train' \(splits: validation\)"):
        read_rows(str(tmp_path / "saved_dict"))
    with pytest.raises(UserError, match=r"reviews: cannot load .*test"):
        read_rows(str(repo), "full", "test")


def test_unknown_hf_dataset_offline_and_missing_files_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="no-such-owner/no-such-dataset: cannot load"):
        read_rows("no-such-owner/no-such-dataset")
    with pytest.raises(UserError, match=r"missing\.csv: file not found"):
        read_rows(str(tmp_path / "missing.csv"))


def test_null_cells_render_as_empty_text(tmp_path: Path):
    spec = _spec(tmp_path, GOLDEN_YAML.replace("Sky: {{ sky }}", "Sky: {{ sky }}."))
    [record] = templatize_rows(spec, [{"sky": None, "label": 0}])
    assert record.instruction == "Sky: .\nWill it rain?"


# ---------------------------------------------------------------- errors


def test_unknown_column_lists_the_available_columns(tmp_path: Path):
    spec = _spec(tmp_path, GOLDEN_YAML.replace("{{ sky }}", "{{ skies }}"))
    with pytest.raises(
        UserError, match=r"template 'sky' uses unknown column 'skies' \(available columns: label, sky;"
    ):
        templatize_rows(spec, ROWS)
    spec = _spec(tmp_path)
    with pytest.raises(UserError, match=r"no column 'cloud' for 'sky' \(available columns: label, sky\)"):
        templatize_rows(spec, ROWS, overrides={"sky": "cloud"})


def test_target_outside_answer_choices_names_the_row(tmp_path: Path):
    spec = _spec(tmp_path, GOLDEN_YAML.replace("{{ answer_choices[label] }}", "{{ label }}"))
    rows = [{"sky": "a", "label": "wet"}, {"sky": "b", "label": "snowy"}]
    with pytest.raises(
        UserError, match=r"row 1: template 'sky': target 'snowy' is not one of answer_choices"
    ):
        templatize_rows(spec, rows)
    spec = _spec(tmp_path)
    for bad in (2, -1, "7"):
        with pytest.raises(UserError, match=rf"row 1: template 'sky': label {bad!r} is neither an index"):
            templatize_rows(spec, [ROWS[0], {"sky": "x", "label": bad}])


def test_empty_rendering_names_the_template(tmp_path: Path):
    bare = _spec(tmp_path, GOLDEN_YAML.replace("Sky: {{ sky }}\n      Will it rain?", "{{ sky }}"))
    with pytest.raises(UserError, match=r"row 0: template 'sky': renders an empty prompt"):
        templatize_rows(bare, [{"sky": " ", "label": 0}])
    free_text = GOLDEN_YAML.replace("{{ answer_choices[label] }}", "{{ answer }}")
    free_text = _spec(tmp_path, free_text.replace("answer_choices: [dry, wet]\n", ""))
    with pytest.raises(UserError, match=r"row 1: template 'sky': renders an empty target"):
        templatize_rows(free_text, [{"sky": "a", "answer": "b"}, {"sky": "c", "answer": None}])


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (GOLDEN_YAML.replace("|||\n", ""), "template 'sky' needs exactly one '|||'"),
        (GOLDEN_YAML.replace("{{ sky }}", "{{ sky }"), "template 'sky': Jinja syntax error"),
        (GOLDEN_YAML.replace("cluster: weather_cls\n", ""), "field 'cluster': missing required field"),
        ("task: [unclosed\n", "t.yaml:2: invalid YAML"),
        (GOLDEN_YAML + "  - id: sky\n    template: a ||| b\n", "template id 'sky' appears twice"),
    ],
)
def test_bad_template_files(tmp_path: Path, yaml_text: str, message: str):
    with pytest.raises(UserError, match=message.replace("|", r"\|").replace("(", r"\(")):
        _spec(tmp_path, yaml_text)


def test_cli_errors_are_one_line_exit_2(tmp_path: Path):
    """The three template errors of the issue (unknown column, target outside answer_choices, empty rendering)
    and bad flags, through the real command: exit code 2, one line on stderr, nothing written or lost."""
    unknown_column = _write(tmp_path / "t.yaml", GOLDEN_YAML.replace("{{ sky }}", "{{ skies }}"))
    raw_target = _write(
        tmp_path / "raw.yaml", GOLDEN_YAML.replace("{{ answer_choices[label] }}", "{{ label }}")
    )
    bare = _write(
        tmp_path / "bare.yaml", GOLDEN_YAML.replace("Sky: {{ sky }}\n      Will it rain?", "{{ sky }}")
    )
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    snowy = tmp_path / "snowy.jsonl"
    snowy.write_text(
        "".join(json.dumps(r) + "\n" for r in [{"sky": "a", "label": "wet"}, {"sky": "b", "label": "snowy"}])
    )
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], {"sky": "  ", "label": 0}]))
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    new_out = str(tmp_path / "o.jsonl")
    cases = [
        (data, ["--template", str(unknown_column), "--out", new_out],
         "template 'sky' uses unknown column 'skies' (available columns: label, sky;"),
        (snowy, ["--template", str(raw_target), "--out", new_out],
         "row 1: template 'sky': target 'snowy' is not one of answer_choices (dry, wet)"),
        (blank, ["--template", str(bare), "--out", new_out], "row 1: template 'sky': renders an empty prompt"),
        (data, ["--template", "sentiment", "--out", str(out)], "already exists"),
        (data, ["--template", "nope", "--out", new_out], "not a shipped template"),
        (data, ["--template", "sentiment", "--shots", "3-1", "--out", new_out], "shots"),
    ]  # fmt: skip
    for source, args, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "selfinstruct.cli", "templatize", str(source), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert out.read_text() == "keep me\n"
    assert not (tmp_path / "o.jsonl").exists()
