"""`make demo` end to end: the offline loop on the built-in real model (SmolLM2-135M-Instruct), every stage for
real, outputs checked — including that the corpus is English text the model wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfinstruct.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]


ENGLISH = {"the", "a", "an", "of", "to", "and", "in", "is", "for", "what", "how", "your", "you", "with", "on"}


@pytest.mark.vllm
@pytest.mark.timeout(1800)  # a real 135M model on 2 CPU cores: ~10 min idle, far more on a loaded machine
def test_demo_runs_the_whole_loop_offline(tmp_path, smollm2_dir):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # offline: the hub is not asked, the built-in model is used
    env.pop("SELFINSTRUCT_DEMO_MODEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "selfinstruct.demo", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"({smollm2_dir})" in "".join(proc.stdout.split())  # the one conversion of the session, reused

    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["finished"] is True
    corpus = list(read_jsonl(run / "corpus.jsonl"))
    assert corpus and all({"instruction", "input", "output"} <= r.keys() for r in corpus)
    # machine-written tasks went through all four stages into the corpus, beside the seeds; they are English
    machine = [r for r in corpus if r["meta"]["origin"] == "machine"]
    assert machine
    texts = {r["instruction"] for r in machine}
    english = [t for t in texts if ENGLISH & set(re.findall(r"[a-z]+", t.lower()))]
    assert len(english) >= 0.8 * len(texts), texts
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
