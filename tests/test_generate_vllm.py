"""Both pipelines against the real in-process vLLM engine (tiny random model) with structured output.

The model writes nonsense, but every stage must run on it end to end: requests go out in calls of 16, JSON
answers are parsed, filters judge the candidates, and a corpus comes out (possibly tiny).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.testing import tiny_vllm_config
from selfinstruct.testing.responders import small_seed_tasks

pytestmark = pytest.mark.vllm


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def test_self_instruct_on_vllm_flows_through_every_stage(vllm_teacher, tiny_model_dir, seeds, tmp_path):
    out = tmp_path / "run"
    cfg = GenerateConfig(
        seeds=str(seeds),
        out=str(out),
        num_instructions=12,
        request_batch=16,
        max_requests=400,
        bootstrap_max_tokens=256,
        instances_max_tokens=512,
        instances_temperature=1.0,  # greedy decoding of a random model gives empty strings
        teacher=tiny_vllm_config(tiny_model_dir),
    )
    assert run_generate(cfg, teacher=vllm_teacher) == 0
    kept = lines(out / "instructions.jsonl")
    assert len(kept) == 12 and len({r["id"] for r in kept}) == 12
    assert all(r["meta"]["teacher_model"] == str(tiny_model_dir) for r in kept)
    labels = lines(out / "classification.jsonl")
    assert sorted(r["id"] for r in labels) == sorted(r["id"] for r in kept)
    assert all(isinstance(r["is_classification"], bool) for r in labels)  # structured output: always JSON
    generated = lines(out / "instances.jsonl")
    assert sorted(r["id"] for r in generated) == sorted(r["id"] for r in kept)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["stages"]["finetune"]["finished"]
    corpus = lines(out / "corpus.jsonl")
    assert summary["corpus_records"] == len(corpus) >= 1
    assert all(r["output"] and r["meta"]["task_id"] in {k["id"] for k in kept} for r in corpus)


def test_alpaca_on_vllm(vllm_teacher, tiny_model_dir, seeds, tmp_path):
    out = tmp_path / "run"
    cfg = GenerateConfig(
        seeds=str(seeds),
        out=str(out),
        pipeline="alpaca",
        num_instructions=3,
        request_batch=8,
        max_requests=80,
        alpaca_new_tasks=3,
        alpaca_max_tokens=768,
        teacher=tiny_vllm_config(tiny_model_dir),
    )
    assert run_generate(cfg, teacher=vllm_teacher) == 0
    summary = json.loads((out / "summary.json").read_text())
    kept = lines(out / "instructions.jsonl")
    assert summary["kept"] == len(kept) and summary["requests"] <= 80
    assert summary["kept"] == 3 or summary["stop_reason"] == "max_requests"
    corpus = lines(out / "corpus.jsonl")
    assert len(corpus) == summary["corpus_records"]
    assert all(len(r["instances"]) == 1 for r in kept)
