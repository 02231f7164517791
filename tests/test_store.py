"""Run store: torn-line recovery, atomic snapshots, and the run lock."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from selfinstruct.errors import UserError
from selfinstruct.store import JsonlWriter, RunDir, atomic_write_json, read_jsonl, recover_torn_tail


def test_writer_appends_batches_and_reads_back(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlWriter(path) as w:
        assert w.write([{"a": 1}, {"a": 2}]) == 2
        assert w.write([]) == 0
    with JsonlWriter(path) as w:
        w.write([{"a": 3, "text": "café ☕"}])
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}, {"a": 3, "text": "café ☕"}]


def test_torn_last_line_moves_to_side_file_and_writing_continues(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlWriter(path) as w:
        w.write([{"n": i, "pad": "x" * 50} for i in range(5)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # crash mid-way through record 4
    assert [r["n"] for r in read_jsonl(path)] == [0, 1, 2, 3]  # readers skip the torn tail
    with JsonlWriter(path) as w:
        assert w.recovered_bytes > 0
        w.write([{"n": 5}])
    assert [r["n"] for r in read_jsonl(path)] == [0, 1, 2, 3, 5]
    torn = (tmp_path / "log.jsonl.torn").read_bytes()
    assert torn.startswith(b'{"n":4') and torn.endswith(b"\n")
    assert path.read_bytes().endswith(b"\n")
    assert recover_torn_tail(path) == 0  # a clean file is left alone


def test_torn_line_without_any_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"half": ')
    assert recover_torn_tail(path) == 9
    assert path.read_bytes() == b""


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: not valid JSON"):
        list(read_jsonl(path))


def test_atomic_snapshot_replaces_whole_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: outputs stay shareable


def _hold_lock(path, ready):
    with RunDir(path):
        ready.set()
        time.sleep(60)


def test_second_process_cannot_open_a_locked_run(tmp_path):
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=_hold_lock, args=(tmp_path / "run", ready))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError, match=rf"in use by another selfinstruct process \(pid {proc.pid}\)"):
            RunDir(tmp_path / "run")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 must release the lock too
        proc.join()
    with RunDir(tmp_path / "run") as run:
        run.writer("x.jsonl").write([{"ok": True}])
    assert list(read_jsonl(tmp_path / "run" / "x.jsonl")) == [{"ok": True}]


def test_kill_9_mid_stream_leaves_only_complete_records(tmp_path):
    """A writer killed at a random moment: every line before the tear is intact, nothing is duplicated."""
    script = (
        "import sys; from selfinstruct.store import JsonlWriter\n"
        "w = JsonlWriter(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    w.write([{'n': i + k, 'pad': 'y' * 300} for k in range(7)]); i += 7\n"
    )
    path = tmp_path / "log.jsonl"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
        time.sleep(0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        JsonlWriter(path).close()  # reopen = recovery
        ns = [r["n"] for r in read_jsonl(path)]
        assert ns and all(r == {"n": r["n"], "pad": "y" * 300} for r in read_jsonl(path))
        assert path.read_bytes().endswith(b"\n")
    assert len(ns) >= 7
