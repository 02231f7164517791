"""`make demo` end to end: the offline loop on a tiny local model, every stage for real, outputs checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfinstruct.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_demo_runs_the_whole_loop_offline(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SELFINSTRUCT_DEMO_MODEL": "no-such-org/no-such-model"}
    proc = subprocess.run(
        [sys.executable, "-m", "selfinstruct.demo", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny model built locally" in " ".join(proc.stdout.split())  # rich wraps lines

    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["finished"] is True
    corpus = list(read_jsonl(run / "corpus.jsonl"))
    assert corpus and all({"instruction", "input", "output"} <= r.keys() for r in corpus)
    # machine-written tasks went through all four stages into the corpus, beside the seeds
    assert any(r["meta"]["origin"] == "machine" for r in corpus)
    assert list(read_jsonl(run / "classification.jsonl")) and list(read_jsonl(run / "instances.jsonl"))
    assert (run / "export" / "messages.jsonl").is_file() and (run / "export" / "README.md").is_file()
    assert (out / "filtered" / "kept.jsonl").is_file()
    assert (out / "tuned" / "adapter_config.json").is_file() and (
        out / "tuned" / "merged" / "config.json"
    ).is_file()

    result = json.loads((out / "eval" / "eval.json").read_text())
    text = json.dumps(result)
    assert "tuned" in text and "base" in text
    table = (out / "eval" / "eval.md").read_text()
    assert "unseen" in table
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert json.loads((out / "report" / "stats.json").read_text())
