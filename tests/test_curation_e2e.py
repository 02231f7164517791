"""Curation end to end through the CLI: generate (fake teacher) → dedup → select 50 (LLM judge + length, ROUGE
diversity) → train the tiny model on the selection; and `evaluate`'s warning when held-out data overlaps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfinstruct.cli import run
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.raters import RatingResponder, rating
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_dedup_select_train(tmp_path, tiny_model_dir):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    run_dir, dedup_dir, select_dir = tmp_path / "run", tmp_path / "dedup", tmp_path / "select"
    teacher = ["--model", "fake-model", "--api-key-env", "", "--concurrency", "4"]
    with FakeOpenAI(responder=RatingResponder(PipelineResponder(seed=5))) as server:
        teacher += ["--base-url", server.url]
        assert run(["generate", str(seeds), "--out", str(run_dir), "--pipeline", "alpaca",
                    "--num-instructions", "90", *teacher]) == 0  # fmt: skip
        corpus = lines(run_dir / "corpus.jsonl")
        # a run directory is a corpus too (its corpus.jsonl)
        assert run(["dedup", str(run_dir), "--out", str(tmp_path / "d0"), "--method", "exact"]) == 0
        assert json.loads((tmp_path / "d0" / "summary.json").read_text())["records"] == len(corpus)
        # the same tasks merged in twice (as happens when runs are combined) must all go
        doubled = tmp_path / "doubled.jsonl"
        doubled.write_text("".join(json.dumps(r) + "\n" for r in corpus + corpus[:20]))
        assert run(["dedup", str(doubled), "--out", str(dedup_dir), "--method", "minhash"]) == 0
        summary = json.loads((dedup_dir / "summary.json").read_text())
        kept = lines(dedup_dir / "kept.jsonl")
        assert summary["records"] == len(corpus) + 20 and len(kept) == summary["kept"] >= 60
        rejected = lines(dedup_dir / "rejected.jsonl")
        assert len(rejected) == summary["removed"]
        assert {r["line"] for r in rejected} >= set(range(len(corpus) + 1, len(corpus) + 21))
        assert run(["select", str(dedup_dir / "kept.jsonl"), "--n", "50", "--out", str(select_dir),
                    "--score", "judge,length", "--diversity", "rouge", *teacher]) == 0  # fmt: skip
    selected = lines(select_dir / "selected.jsonl")
    assert len(selected) == 50
    assert {r["meta"]["select"]["scores"]["judge"] for r in selected} <= {1, 2, 3, 4, 5}
    assert all(r["meta"]["select"]["scores"]["judge"] == rating(r["output"]) for r in selected)
    assert len(lines(select_dir / "scores.jsonl")) == 2 * len({json.dumps(r, sort_keys=True) for r in kept})
    # what export reads too: each record exported once, in order, with its text unchanged
    for src, rows in ((dedup_dir / "kept.jsonl", kept), (select_dir / "selected.jsonl", selected)):
        out = tmp_path / f"{src.stem}.messages.jsonl"
        assert run(["export", str(src), "--format", "messages", "--out", str(out)]) == 0
        exported = lines(out)
        assert [e["completion"][0]["content"] for e in exported] == [r["output"] for r in rows]
    assert run(["train", "--data", str(select_dir / "selected.jsonl"), "--model", str(tiny_model_dir),
                "--out", str(tmp_path / "model"), "--max-steps", "3", "--batch-size", "8"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["train_examples"] == 50 and summary["global_step"] == 3
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_evaluate_warns_when_heldout_overlaps_training_data(tmp_path, tiny_model_dir, capsys):
    from selfinstruct.evaluate import EvalTeacherConfig, EvaluateConfig, evaluate

    train = tmp_path / "train.jsonl"
    heldout = tmp_path / "heldout.jsonl"
    rows = [{"instruction": t["instruction"], "input": t["instances"][0]["input"], "output": t["instances"][0]["output"]}
            for t in small_seed_tasks()]  # fmt: skip
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in [*rows[20:], {**rows[3], "output": "other"}]))
    with FakeOpenAI() as server:
        result = evaluate(
            EvaluateConfig(
                model=str(tiny_model_dir),
                served_model="fake-model",
                data=str(heldout),
                train_data=str(train),
                out=str(tmp_path / "eval"),
                template="alpaca",
                loss=False,
                teacher=EvalTeacherConfig(backend="openai", base_url=[server.url], api_key_env=""),
            )
        )
    assert result["train_overlap"] == {
        "exact": 1,
        "near": 1,
        "records": 5,
        "threshold": 0.6,
        "examples": [rows[3]["instruction"]],
    }
    err = capsys.readouterr().err
    assert "warning: 1 of 5 held-out records overlap the training corpus" in err
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["train_overlap"]["near"] == 1
