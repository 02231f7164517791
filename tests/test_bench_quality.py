"""benchmarks/bench_quality.py re-measuring a subset of its runs (`--pipelines`, `--styles`) against the fake server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


def bench_main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    return module.main()


def test_pipelines_and_styles_remeasure_only_those_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    old_run = {"alpaca": {"requests": 7}, "corpus": {"wall_s": 100.0}}
    classify = {"n": 209, "label/chat-structured": {"wall_s": 1.0}, "label/completions": {"wall_s": 2.0},
                "logprob-calibrated/chat": {"wall_s": 3.0}, "logprob-calibrated/completions": {"wall_s": 4.0}}  # fmt: skip
    old = {
        "model": "m",
        "wall_s": 1234.5,
        "runs": {"alpaca/completions": old_run, "self-instruct/completions": {"stale": True}},
        "classify_on_seeds": classify,
        "samples": [
            {"run": "alpaca/completions", "instruction": "kept"},
            {"run": "self-instruct/completions"},
        ],
    }
    out = tmp_path / "quality.json"
    out.write_text(json.dumps(old))
    work = tmp_path / "work"
    argv = ["--base-url", "", "--model", "fake-model", "--seeds", str(seeds), "--num-instructions", "4",
            "--concurrency", "2", "--samples", "3", "--pipelines", "self-instruct", "--styles", "completions",
            "--out", str(out), "--work", str(work)]  # fmt: skip
    with FakeOpenAI(PipelineResponder(seed=1)) as server:
        argv[1] = server.url
        assert bench_main(monkeypatch, *argv) == 0
        first = json.loads(out.read_text())
        calls = len(server.requests)
        # a rerun on the same --work re-reads the ended run instead of resuming it into an empty session
        assert bench_main(monkeypatch, *argv) == 0
        assert len(server.requests) == calls
    assert json.loads(out.read_text()) == first

    assert set(first["runs"]) == {"alpaca/completions", "self-instruct/completions"}
    assert first["runs"]["alpaca/completions"] == old_run
    assert first["classify_on_seeds"] == {**classify, "wall_s": 10.0}  # not re-measured
    assert first["wall_s"] == 1234.5
    remeasured = first["runs"]["self-instruct/completions"]
    assert remeasured["bootstrap"]["requests"] > 0 and remeasured["bootstrap"]["kept"] == 4
    assert remeasured["corpus"]["corpus_records"] > 0
    assert first["teacher_wall_s"] == round(100.0 + remeasured["corpus"]["wall_s"] + 10.0, 1)
    # the other runs' samples stay; the re-measured run's are drawn afresh, up to --samples in all
    assert first["samples"][0] == old["samples"][0]
    assert [s["run"] for s in first["samples"][1:]] == ["self-instruct/completions"] * 2
    assert all(s["instruction"] for s in first["samples"])

    with pytest.raises(SystemExit) as bad:
        bench_main(monkeypatch, "--styles", "chat,completions", "--out", str(out))
    assert bad.value.code == 2
    assert "--styles: unknown chat" in capsys.readouterr().err
