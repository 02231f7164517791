"""Stopping an in-process vLLM run for real: `selfinstruct generate --teacher vllm` in a subprocess on the tiny
model gets SIGTERM (as from `kill`) or SIGINT sent to its whole process group (as from Ctrl-C in a terminal,
which reaches vLLM's engine processes too) while requests are in flight. It must exit within 10 s with its
code, leave every journal file whole and a final summary, and leave none of its engine processes behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from selfinstruct.testing.responders import small_seed_tasks

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0


def journal_lines(path: Path) -> int:
    """Every line is complete JSON (a torn line fails the test); returns how many there are."""
    text = path.read_text() if path.exists() else ""
    assert not text or text.endswith("\n"), f"{path.name} ends in a torn line"
    return len([json.loads(line) for line in text.splitlines()])


@pytest.mark.parametrize(("sig", "group", "code"), [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)])
def test_signal_stops_an_in_process_vllm_run_quickly(tiny_model_dir, tmp_path, sig, group, code):
    seeds, out = tmp_path / "seeds.jsonl", tmp_path / "run"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    cmd = [
        sys.executable, "-m", "selfinstruct.cli", "generate", str(seeds), "--out", str(out),
        "--teacher", "vllm", "--model", str(tiny_model_dir), "--teacher-dtype", "float32",
        "--gpu-memory-utilization", "0.1", "--enforce-eager", "--max-model-len", "2048",
        "--engine-args", '{"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": true}}',
        # a target it never reaches and long answers: requests are always in flight when the signal comes
        "--num-instructions", "100000", "--bootstrap-max-tokens", "128", "--concurrency", "8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "generate.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while journal_lines(out / "rejected.jsonl") + journal_lines(out / "instructions.jsonl") == 0:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "nothing written in 600 s"
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("EngineCore" in p.name() for p in family)  # the engine runs in its own processes
        sent = time.monotonic()
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    print(f"{signal.Signals(sig).name}: exited {proc.returncode} after {took:.1f} s")
    assert took < STOP_WITHIN_S, output[-3000:]
    assert proc.returncode == code, output[-3000:]
    assert "generate stopped (interrupted)" in output and "Traceback" not in output
    counts = {name: journal_lines(out / name) for name in ("instructions.jsonl", "rejected.jsonl")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and not summary["finished"]
    assert summary["kept"] == counts["instructions.jsonl"]  # the summary counts exactly what is on disk
    assert sum(summary["rejected_by_reason"].values()) == counts["rejected.jsonl"]
    # the engine's processes go too (a worker that got the Ctrl-C itself may take a few seconds to notice)
    gone_by = time.monotonic() + STOP_WITHIN_S
    while (left := [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and (
        time.monotonic() < gone_by
    ):
        time.sleep(0.2)
    assert not left, [(p.pid, p.name()) for p in left]
