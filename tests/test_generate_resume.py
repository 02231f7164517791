"""Crash safety of a real `selfinstruct generate` process: SIGKILL at random moments and resume; Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

TARGET = 120
FILES = ("instructions.jsonl", "rejected.jsonl", "classification.jsonl", "instances.jsonl", "corpus.jsonl")


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def command(seeds: Path, out: Path, server: FakeOpenAI, target: int = TARGET) -> list[str]:
    return [
        sys.executable, "-m", "selfinstruct.cli", "generate", str(seeds), "--out", str(out),
        "--num-instructions", str(target), "--model", "fake-model", "--base-url", server.url, "--api-key-env", "",
        "--concurrency", "4", "--max-retries", "2", "--backoff", "0.01",
    ]  # fmt: skip


def written(out: Path) -> int:
    return sum((out / name).stat().st_size for name in FILES if (out / name).exists())


def complete_lines(path: Path) -> list[str]:
    """Lines a reader can trust right after a crash: all but a torn (unterminated) last one, each valid JSON."""
    if not path.exists():
        return []
    data = path.read_text()
    body = data if data.endswith("\n") else data[: data.rfind("\n") + 1]
    out = body.splitlines()
    for line in out:
        json.loads(line)  # a torn line in the middle fails here
    return out


def test_sigkill_at_random_moments_then_resume(seeds, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(20261121)
    seen: list[str] = []  # complete instruction lines observed after each kill
    kills, target = 0, TARGET
    with FakeOpenAI(responder=PipelineResponder(seed=31), latency=0.03) as server:
        while kills < 5:
            before = written(out)
            proc = subprocess.Popen(
                command(seeds, out, server, target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            while proc.poll() is None and written(out) == before:  # start-up takes a while: wait for writes
                time.sleep(0.01)
            try:
                proc.wait(timeout=rng.uniform(0.0, 0.8))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:  # it finished before the kill: ask for more (still a resume of the same run) and go on
                assert proc.returncode == 0, proc.stderr.read()
                target += 40
            proc.stderr.close()
            now = complete_lines(out / "instructions.jsonl")
            assert now[: len(seen)] == seen, "a kept record was lost or rewritten"
            seen = now
            for name in FILES[1:]:
                complete_lines(out / name)
            if (out / "summary.json").exists():  # atomic snapshot: always whole, never ahead of the data
                assert json.loads((out / "summary.json").read_text())["kept"] <= len(now)
        final = subprocess.run(
            command(seeds, out, server, target), capture_output=True, text=True, timeout=120
        )
    assert final.returncode == 0, final.stderr
    kept = [json.loads(line) for line in complete_lines(out / "instructions.jsonl")]
    assert (out / "instructions.jsonl").read_text().endswith("\n")
    assert [r["id"] for r in kept] == [f"gen_{i:06d}" for i in range(target)]  # no loss, no duplicate, no gap
    assert [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in kept[: len(seen)]] == seen
    assert len({r["instruction"].lower() for r in kept}) == target
    for name in ("classification.jsonl", "instances.jsonl"):
        ids = [json.loads(line)["id"] for line in complete_lines(out / name)]
        assert sorted(ids) == sorted(r["id"] for r in kept), name  # each exactly once
    for name in FILES:
        assert (out / name).read_text().endswith("\n")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["kept"] == target and summary["sessions"] >= 6
    assert summary["corpus_records"] == len(complete_lines(out / "corpus.jsonl")) > 0


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(seeds, tmp_path):
    out = tmp_path / "run"
    with FakeOpenAI(responder=PipelineResponder(seed=32), latency=0.05) as server:
        proc = subprocess.Popen(
            command(seeds, out, server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while len(complete_lines(out / "instructions.jsonl")) < 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "stopping" in stderr and "rerun the same command" in stderr and "Traceback" not in stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "interrupted" and not summary["finished"]
        assert summary["kept"] == len(
            complete_lines(out / "instructions.jsonl")
        )  # every accepted write finished
        assert (out / "instructions.jsonl").read_text().endswith("\n")
        rerun = subprocess.run(command(seeds, out, server), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "summary.json").read_text())["finished"]
