"""The run directory: append-only JSONL logs, atomic snapshots, and a lock.

Crash safety rests on three rules. (1) Records are only ever appended, a batch per `write` call, followed by
flush + fsync, so after a crash every line but possibly the last is complete. (2) On reopen a torn last line is
moved to `<name>.torn` and the file is cut back to its last newline: no complete record is ever dropped, and
nothing after the tear is lost either (it is kept in the side file). (3) Snapshot files (summary, state,
config) are written to a temp file in the same directory, fsynced and renamed over the old one, so a reader
sees the old or the new version, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfinstruct.errors import InputFileError, UserError

# ---------------------------------------------------------------- atomic snapshots


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`, else removed.

    Files get the usual umask mode (mkstemp alone would leave them 0600), so outputs stay shareable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that readers never see a partial file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- append-only JSONL


def existing_outputs(paths: Iterable[Path], force: bool) -> list[Path]:
    """The output files that already exist; unless `force`, one is a UserError (a command never clobbers
    earlier results by accident). With `force` the caller replaces them."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists (use --force to overwrite)")
    return existing


def recover_torn_tail(path: str | Path) -> int:
    """Move an incomplete last line to `<path>.torn` and truncate; return the number of bytes moved."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back for the last newline in chunks; the tail after it is the torn line.
        pos, chunk = size, 1 << 16
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.seek(cut)
        tail = f.read()
        with open(f"{path}.torn", "ab") as side:
            side.write(tail + b"\n")
            side.flush()
            os.fsync(side.fileno())
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return len(tail)


class JsonlWriter:
    """Appends JSON records; each `write` call is one write(2) of whole lines followed by fsync."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recovered_bytes = recover_torn_tail(self.path)
        self._fsync = fsync
        self._f = open(self.path, "ab")  # noqa: SIM115 - held open for the life of the writer

    def write(self, records: Iterable[dict[str, Any]]) -> int:
        data = b"".join(
            json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n" for r in records
        )
        if not data:
            return 0
        self._f.write(data)
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        return data.count(b"\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read complete records; a torn final line (no newline, bad JSON) is ignored, a bad middle line is an error."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if n - 1 == last:  # torn tail of a file another process is appending to, or crashed while writing
                return
            raise InputFileError(path, n, f"not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise InputFileError(path, n, "expected a JSON object")
        yield record


# ---------------------------------------------------------------- the run directory


class RunLock:
    """An exclusive, advisory lock on a run directory; released by the OS even after kill -9."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"{self.path.parent}: run directory is in use by another selfinstruct process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class RunDir:
    """One directory per run, held under a lock for as long as the object is open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create run directory ({e.strerror})") from None
        self._lock = RunLock(self.path)
        self._lock.acquire()
        self._writers: list[JsonlWriter] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def writer(self, name: str) -> JsonlWriter:
        w = JsonlWriter(self.path / name)
        self._writers.append(w)
        return w

    def snapshot(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
