"""`selfinstruct export`: every format loads with `datasets` and equals the corpus; the messages export goes
through TRL's SFTTrainer data preparation unchanged; the dataset card is right; nothing is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from selfinstruct.errors import UserError
from selfinstruct.export import ExportConfig, run_export

RECORDS = [
    {
        "instruction": "Reverse the word.",
        "input": "hello",
        "output": "olleh",
        "meta": {"task_id": "gen_1", "origin": "machine", "is_classification": False, "round": 1},
    },
    {
        "instruction": "Name a colour you like and say why.",
        "input": "",
        "output": "Blue, because it is calm.\nAlso green.",
        "meta": {"task_id": "gen_2", "origin": "seed", "is_classification": None},
    },
    {
        "instruction": "Is this review positive?",
        "input": "J'adore ce café <-- vraiment --> !",
        "output": "Yes",
        "meta": {"task_id": "gen_3", "origin": "machine", "is_classification": True, "round": 2},
    },
    {
        "instruction": "Sort the numbers in ascending order.",
        "input": "5, 3, 9, 1\n2, 8",
        "output": "1, 2, 3, 5, 8, 9",
        "meta": {"task_id": "gen_4", "origin": "machine", "is_classification": False, "round": 2},
    },
]
ALPACA = [{k: r[k] for k in ("instruction", "input", "output")} for r in RECORDS]
EXPECTED_USER = [
    "Reverse the word.\n\nhello",
    "Name a colour you like and say why.",
    "Is this review positive?\n\nJ'adore ce café <-- vraiment --> !",
    "Sort the numbers in ascending order.\n\n5, 3, 9, 1\n2, 8",
]
SUMMARY = {
    "pipeline": "alpaca",
    "teacher_model": "teacher-xl",
    "kept": 4,
    "candidates": 11,
    "rejected_by_reason": {"too_similar": 5, "too_short": 2},
    "parse_failures": 1,
    "requests": 3,
    "finished": True,
}
CONFIG_TOML = """\
[generate]
pipeline = "alpaca"
num_instructions = 4
seed = 7

[teacher]
backend = "openai"
model = "teacher-xl"
api_key = "sk-do-not-leak"
base_url = ["http://user:hunter2@localhost:8000/v1"]
"""


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    write_jsonl(run / "corpus.jsonl", RECORDS)
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "config.toml").write_text(CONFIG_TOML)
    return run


def export(source, fmt, **kw):
    assert run_export(ExportConfig(source=str(source), format=fmt, **kw)) == 0


def load(path, tmp_path):
    from datasets import load_dataset

    builder = "parquet" if path.suffix == ".parquet" else "json"
    return load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def front_matter(card_text):
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


@pytest.mark.parametrize(
    ("fmt", "file", "expected"),
    [
        ("alpaca", "alpaca.jsonl", ALPACA),
        ("alpaca-json", "alpaca.json", ALPACA),
        ("parquet", "alpaca.parquet", ALPACA),
        (
            "messages",
            "messages.jsonl",
            [
                {
                    "prompt": [{"role": "user", "content": u}],
                    "completion": [{"role": "assistant", "content": r["output"]}],
                }
                for u, r in zip(EXPECTED_USER, RECORDS, strict=True)
            ],
        ),
        (
            "sharegpt",
            "sharegpt.jsonl",
            [
                {"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": r["output"]}]}
                for u, r in zip(EXPECTED_USER, RECORDS, strict=True)
            ],
        ),
    ],
)
def test_every_format_loads_with_datasets_and_equals_the_corpus(run_dir, tmp_path, fmt, file, expected):
    export(run_dir, fmt)
    out = run_dir / "export" / file
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "an export gets the usual file mode, not 0600"
    assert load(out, tmp_path).to_list() == expected
    assert not list(out.parent.glob(".*.tmp")), "no temp files left behind"


def test_alpaca_json_is_one_array_as_in_the_alpaca_release(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    export(corpus, "alpaca-json")
    assert json.loads((tmp_path / "c-export" / "alpaca.json").read_text()) == ALPACA


def test_keep_meta_and_system_prompt(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    export(corpus, "alpaca", keep_meta=True, out=str(tmp_path / "a.jsonl"), card=False)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows == RECORDS
    assert load(tmp_path / "a.jsonl", tmp_path)[0]["meta"]["task_id"] == "gen_1"
    assert not (tmp_path / "README.md").exists()

    export(corpus, "parquet", keep_meta=True, out=str(tmp_path / "a.parquet"), card=False)
    assert [json.loads(m) for m in load(tmp_path / "a.parquet", tmp_path)["meta"]] == [
        r["meta"] for r in RECORDS
    ]

    export(corpus, "messages", system="Answer briefly.", out=str(tmp_path / "m.jsonl"), card=False)
    row = load(tmp_path / "m.jsonl", tmp_path)[0]
    assert row["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": EXPECTED_USER[0]},
    ]
    export(corpus, "sharegpt", system="Answer briefly.", out=str(tmp_path / "s.jsonl"), card=False)
    assert load(tmp_path / "s.jsonl", tmp_path)[0]["conversations"][0] == {
        "from": "system",
        "value": "Answer briefly.",
    }

    with pytest.raises(UserError, match="--system applies only to --format messages or sharegpt"):
        export(corpus, "alpaca", system="x", out=str(tmp_path / "b.jsonl"))


def test_messages_export_goes_through_sft_trainer_unchanged(run_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    export(run_dir, "messages", system="You are helpful.")
    dataset = load(run_dir / "export" / "messages.jsonl", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=1,
            per_device_train_batch_size=2,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    processed = trainer.train_dataset
    # TRL 1.16 folds the completion mask into `labels` (-100 on the prompt) during preparation.
    assert {"input_ids", "labels"} <= set(processed.column_names)
    for row, ex in zip(processed, dataset, strict=True):
        prompt_text = tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
        masked = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert all(label == -100 for label in row["labels"][:masked])
        assert row["labels"][masked:] == row["input_ids"][masked:]
        assert tokenizer.decode(row["input_ids"][:masked]) == prompt_text
        assert tokenizer.decode(row["input_ids"][masked:]).startswith(
            ex["completion"][0]["content"] + "<|im_end|>"
        )
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0


def test_dataset_card_counts_stats_provenance_and_front_matter(run_dir, tmp_path):
    export(run_dir, "messages", license="cc-by-4.0")
    export(run_dir, "parquet")
    export(run_dir, "alpaca")
    card = (run_dir / "export" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"] and meta["language"] == ["en"]
    assert meta["pretty_name"] == "my-run"
    # JSON exports are hub configs (messages first = default); the Parquet file is listed but not a config.
    assert [(c["config_name"], c["data_files"][0]["path"]) for c in meta["configs"]] == [
        ("messages", "messages.jsonl"),
        ("alpaca", "alpaca.jsonl"),
    ]
    assert meta["configs"][0]["default"] is True
    assert "`alpaca.parquet` (4 rows; not in `configs`" in card
    assert "| records | 4 | 100.0% |" in card
    assert "| records with an input | 3 | 75.0% |" in card
    assert "| origin: machine | 3 | 75.0% |" in card
    assert "| classification tasks | 1 | 25.0% |" in card
    # instruction words 3, 8, 4, 6: mean 5.25, median 5, p90 8; only 3 records have an input: 1, 7, 6 words
    assert "| instruction | 4 | 5.2 | 5 | 8 | 8 |" in card
    assert "| input | 3 | 4.7 | 6 | 7 | 7 |" in card
    assert "Teacher model: `teacher-xl`" in card and "Pipeline: `alpaca`" in card
    assert "Kept instructions: 4 of 11 candidates; rejected 7 (too_similar 5, too_short 2)" in card
    assert "`num_instructions = 4`" in card and "`seed = 7`" in card
    assert 'load_dataset("json", data_files="messages.jsonl", split="train")' in card
    assert "SFTTrainer" in card
    assert "sk-do-not-leak" not in card and "hunter2" not in card
    # --license was given on the first export only and stays on the card
    assert meta["license"] == "cc-by-4.0" and "Released under `cc-by-4.0`" in card

    # a corpus file (no run metadata): teacher unknown, card next to the export, hub metadata still valid
    corpus = write_jsonl(tmp_path / "corpus.jsonl", RECORDS[:1])
    export(corpus, "sharegpt", license="apache-2.0", name="Tiny set")
    card = (tmp_path / "corpus-export" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["pretty_name"] == "Tiny set"
    assert meta["configs"] == [
        {
            "config_name": "sharegpt",
            "default": True,
            "data_files": [{"split": "train", "path": "sharegpt.jsonl"}],
        }
    ]
    assert "| records | 1 | 100.0% |" in card and "Teacher model: unknown" in card


def test_card_front_matter_loads_each_config_from_the_folder(run_dir, tmp_path):
    from datasets import load_dataset

    export(run_dir, "alpaca")
    export(run_dir, "messages")
    for config, column in [("alpaca", "instruction"), ("messages", "prompt")]:
        ds = load_dataset(
            str(run_dir / "export"), config, split="train", cache_dir=str(tmp_path / "hf-cache")
        )
        assert len(ds) == len(RECORDS) and column in ds.column_names


def test_no_overwrite_without_force(run_dir, tmp_path):
    export(run_dir, "alpaca")
    out = run_dir / "export" / "alpaca.jsonl"
    before = out.read_text()
    with pytest.raises(UserError, match=r"alpaca.jsonl: already exists \(use --force to overwrite\)"):
        export(run_dir, "alpaca")
    write_jsonl(run_dir / "corpus.jsonl", RECORDS[:2])
    export(run_dir, "alpaca", force=True)
    assert out.read_text() != before and len(out.read_text().splitlines()) == 2

    # a README.md we did not write is never replaced silently (and nothing is written then)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("# my notes\n")
    with pytest.raises(UserError, match=r"README.md: exists and was not written by selfinstruct export"):
        export(run_dir, "alpaca", out=str(tmp_path / "mine"))
    assert not (tmp_path / "mine" / "alpaca.jsonl").exists()
    export(run_dir, "alpaca", out=str(tmp_path / "mine"), force=True)
    assert "selfinstruct-export" in (tmp_path / "mine" / "README.md").read_text()

    with pytest.raises(UserError, match="is the corpus being exported"):
        export(run_dir, "alpaca", out=str(run_dir / "corpus.jsonl"), force=True)


def test_card_drops_exports_of_other_data(run_dir):
    export(run_dir, "alpaca")
    write_jsonl(run_dir / "corpus.jsonl", RECORDS[:3])  # the run went on: the corpus changed
    export(run_dir, "messages")
    meta = front_matter((run_dir / "export" / "README.md").read_text())
    assert [c["config_name"] for c in meta["configs"]] == ["messages"]


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "selfinstruct.cli", "export", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_cli_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALPACA[0]) + "\n" + json.dumps(ALPACA[1]) + "\n" + '{"instruction": 3}\n')
    run = tmp_path / "empty-run"
    run.mkdir()
    cases = [
        (("bad.jsonl", "--format", "messages"), "bad.jsonl:3: field 'instruction'"),
        (("missing.json",), "missing.json: no such run directory or corpus file"),
        (("empty-run",), "no corpus.jsonl in this run directory yet"),
        (("bad.jsonl", "--format", "csv"), "invalid setting format from --format"),
    ]
    for args, message in cases:
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr

    good = write_jsonl(tmp_path / "good.jsonl", ALPACA)
    proc = cli(good, "--format", "alpaca-json", cwd=tmp_path)
    assert proc.returncode == 0 and "wrote 4 records" in proc.stdout
    proc = cli(good, "--format", "alpaca-json", cwd=tmp_path)
    assert proc.returncode == 2 and "already exists (use --force to overwrite)" in proc.stderr
    assert cli(good, "--format", "alpaca-json", "--force", cwd=tmp_path).returncode == 0
