"""FLAN-style data end to end through the CLI: templatize two example datasets, mix them, hold out one cluster
with `split`, train the tiny model on the rest, and check that `evaluate` reports the held-out cluster as unseen."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.corpus import load_corpus_any

EXAMPLES = Path(__file__).resolve().parents[1] / "seeds" / "flan_examples"


@pytest.mark.vllm
@pytest.mark.usefixtures("one_torch_thread")
def test_heldout_cluster_is_reported_unseen(tiny_model_dir: Path, tmp_path: Path):
    def run(*args: str) -> None:
        assert cli.run(list(args)) == 0

    sentiment, topic, mixture = tmp_path / "sentiment.jsonl", tmp_path / "topic.jsonl", tmp_path / "mix.jsonl"
    run("templatize", str(EXAMPLES / "sentiment.jsonl"), "--template", "sentiment", "--shots", "0-1",
        "--out", str(sentiment))  # fmt: skip
    run("templatize", str(EXAMPLES / "topic.csv"), "--template", "topic", "--out", str(topic))
    run("mix", f"{sentiment}:0.5", f"{topic}:0.5", "--cap-per-task", "12", "--out", str(mixture))
    records = load_corpus_any(mixture)
    assert Counter(r.meta["cluster"] for r in records) == {"sentiment": 12, "topic_classification": 12}

    split = tmp_path / "split"
    run(
        "split",
        str(mixture),
        "--holdout-categories",
        "sentiment",
        "--holdout-fraction",
        "0",
        "--out",
        str(split),
    )
    train_records = load_corpus_any(split / "train.jsonl")
    heldout = load_corpus_any(split / "heldout.jsonl")
    assert {r.meta["cluster"] for r in train_records} == {"topic_classification"}
    assert {r.meta["cluster"] for r in heldout} == {"sentiment"}

    model = tmp_path / "model"
    run("train", "--data", str(split / "train.jsonl"), "--model", str(tiny_model_dir), "--out", str(model),
        "--batch-size", "4", "--grad-accum", "1", "--max-steps", "3", "--eval-fraction", "0")  # fmt: skip
    engine = json.dumps({"structured_outputs_config": {"backend": "xgrammar"}})
    run("evaluate", "--model", str(model), "--base", str(model), "--data", str(split / "heldout.jsonl"),
        "--train-data", str(split / "train.jsonl"), "--out", str(tmp_path / "eval"), "--max-tokens", "4",
        "--teacher", "vllm", "--teacher-dtype", "float32", "--gpu-memory-utilization", "0.1",
        "--enforce-eager", "--max-model-len", "2048", "--engine-args", engine)  # fmt: skip

    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["categories"]["sentiment"]["unseen"] is True
    assert result["overall"]["unseen"]["examples"] == len(heldout) == 12
    assert "seen" not in result["overall"]
    tuned = result["categories"]["sentiment"]["tuned"]
    assert tuned["classification_examples"] == sum(r.meta["is_classification"] for r in heldout)
    assert "sentiment (unseen)" in (tmp_path / "eval" / "eval.md").read_text()
