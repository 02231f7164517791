"""The machinery every teacher-driven stage shares: the in-flight loop, the group-commit journal, budget caps.

Why a loop of our own: the reference sends one batch, waits, filters, sends the next, so the teacher idles
while Python filters and Python idles while the teacher thinks. `drive` keeps up to `slots` teacher calls in
flight and filters each finished one while the others are still running. Finished calls are handed to the
stage in the order they complete (calls that finish together: in the order they were sent), so the novelty
filter sees candidates in one well-defined order; with a single slot that order is the request order and a
seeded run is reproducible.

Why a journal: an fsync costs ~5 ms on ordinary disks, far more than filtering a completion. Records are
handed to a background thread that appends everything that arrived since its last write in one write + fsync
per file (group commit), so the event loop never waits for the disk. A record counts as kept once it is
durable; `flush()` waits for that (at the end of a stage, before a summary, on Ctrl-C).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from selfinstruct.errors import UserError
from selfinstruct.store import RunDir, atomic_write_json
from selfinstruct.teachers.base import Teacher, TeacherRequest, TeacherResponse, TeacherStats, Totals

# ---------------------------------------------------------------- budget caps


@dataclass
class Budget:
    """`--max-requests`, `--max-tokens`, `--max-cost` over the whole run (all sessions, all stages).

    Requests are capped exactly (in-flight requests count); tokens and cost are only known when an answer
    arrives, so no new request starts once they are reached and the ones in flight finish.
    """

    max_requests: int | None
    max_tokens: int | None
    max_cost: float | None
    earlier: Totals
    stats: TeacherStats
    at_start: Totals  # the teacher's own totals when this session began (a shared teacher may have some)

    @classmethod
    def resumed(cls, cfg: Any, usage: dict[str, Any], stats: TeacherStats) -> Budget:
        """The caps of a command's settings (`max_requests`, `max_tokens`, `max_cost`) for this session of a
        run whose earlier sessions spent `usage` (from state.json); `stats` are the teacher's own counters."""
        return cls(
            cfg.max_requests, cfg.max_tokens, cfg.max_cost, Totals(**usage), stats, at_start=Totals.of(stats)
        )

    def total(self) -> Totals:
        return self.earlier.plus(self.stats).plus(self.at_start, -1)

    def exhausted(self, in_flight: int = 0) -> str | None:
        """The name of the first cap reached, or None."""
        u = self.total()
        if self.max_requests is not None and u.requests + in_flight >= self.max_requests:
            return "max_requests"
        if self.max_tokens is not None and u.prompt_tokens + u.completion_tokens >= self.max_tokens:
            return "max_tokens"
        if self.max_cost is not None and u.cost >= self.max_cost:
            return "max_cost"
        return None

    def requests_left(self, in_flight: int) -> int | None:
        if self.max_requests is None:
            return None
        return max(0, self.max_requests - self.total().requests - in_flight)


# ---------------------------------------------------------------- group-commit journal


class Journal:
    """Append-only JSONL files and snapshot files written by one background thread, many records per fsync.

    `names` are opened at once (opening recovers a torn last line); a file first named by `append` (a stage's
    own output) is opened by the writer thread before its first write."""

    def __init__(self, run: RunDir, names: Sequence[str]):
        self.run = run
        self._writers = {name: run.writer(name) for name in names}
        self._pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._snapshots: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._submitted = 0
        self._durable = 0
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="journal", daemon=True)
        self._thread.start()

    def append(self, name: str, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        with self._cond:
            self._raise_if_failed()
            self._pending[name].extend(records)
            self._submitted += 1
            self._cond.notify()

    def snapshot(self, name: str, obj: Any) -> None:
        """Atomically replace `name` with `obj` as JSON, after every record appended before this call."""
        with self._cond:
            self._raise_if_failed()
            self._snapshots[name] = obj
            self._submitted += 1
            self._cond.notify()

    def flush(self) -> None:
        """Block until everything submitted so far is on disk."""
        with self._cond:
            target = self._submitted
            while self._durable < target and self._error is None:
                self._cond.wait()
            self._raise_if_failed()

    async def aflush(self) -> None:
        await asyncio.to_thread(self.flush)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise UserError(f"{self.run.path}: cannot write the run directory ({self._error})")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._snapshots and not self._closing:
                    self._cond.wait()
                if not self._pending and not self._snapshots:
                    return
                pending, self._pending = self._pending, defaultdict(list)
                snapshots, self._snapshots = self._snapshots, {}
                upto = self._submitted
            try:
                for name, records in pending.items():
                    if name not in self._writers:
                        self._writers[name] = self.run.writer(name)
                    self._writers[name].write(records)
                for name, obj in snapshots.items():
                    atomic_write_json(self.run / name, obj)
            except BaseException as e:  # disk full, permissions: surfaced to the event loop on its next call
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._durable = upto
                self._cond.notify_all()


# ---------------------------------------------------------------- the in-flight loop


class CallSource(Protocol):
    """A stage as `drive` sees it."""

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        """The requests of the next teacher call, or None when nothing should start now.

        `in_flight` is the number of requests already sent and not yet answered.
        """

    def handle(self, responses: list[TeacherResponse]) -> None:
        """Parse, filter and journal the answers of one call (runs on the event loop: keep it CPU-light)."""

    def satisfied(self) -> bool:
        """True once no answer still in flight can be of use (a growing stage that reached its target); the
        calls still in flight are then cancelled and their requests passed to `abandoned`."""

    def abandoned(self, requests: list[TeacherRequest]) -> None:
        """Requests sent and then given up because the source was satisfied (they count as sent)."""


class NeedsEveryAnswer:
    """For a `CallSource` that is never done early: every answer it asked for is used."""

    def satisfied(self) -> bool:
        return False

    def abandoned(self, requests: list[TeacherRequest]) -> None:
        """Never called: a source that is never satisfied abandons nothing."""


async def drive(teacher: Teacher, source: CallSource, slots: int, stop: asyncio.Event) -> bool:
    """Keep up to `slots` calls in flight until the source has nothing more to send and all calls returned.

    Finished calls land in a queue as they complete (O(1) per call, however many are in flight) and are
    handled in that order. Returns False when `stop` was set (Ctrl-C): calls still in flight are cancelled
    and their answers dropped; answers already received are handled first. Calls still in flight when the
    source is `satisfied()` are cancelled too (a slow teacher would otherwise finish answers nobody needs).
    """
    finished: asyncio.Queue[asyncio.Future[list[TeacherResponse]] | None] = asyncio.Queue()
    pending: dict[asyncio.Future[list[TeacherResponse]], list[TeacherRequest]] = {}  # call -> its requests
    # Requests sent and not yet counted by the teacher. Derived from the teacher's own count rather than from
    # the queue of finished calls: a call can be counted in `teacher.stats` a moment before its future reaches
    # the queue, and counting it twice would stop a `--max-requests` budget one request early.
    sent, counted_before = 0, teacher.stats.requests

    async def wait_for_stop() -> None:
        await stop.wait()
        finished.put_nowait(None)

    stop_waiter = asyncio.ensure_future(wait_for_stop())
    try:
        while True:
            while len(pending) < slots and not stop.is_set():
                batch = source.next_call(max(0, sent - (teacher.stats.requests - counted_before)))
                if not batch:
                    break
                call = asyncio.ensure_future(teacher.generate(batch))
                call.add_done_callback(finished.put_nowait)
                pending[call] = batch
                sent += len(batch)
            if not pending:
                return not stop.is_set()
            done = [await finished.get()]
            while not finished.empty():
                done.append(finished.get_nowait())
            for call in done:
                if call is None:
                    continue
                del pending[call]
                source.handle(call.result())  # a UserError (every endpoint failing) ends the run
            if stop.is_set():
                return False
            if source.satisfied():
                source.abandoned([r for batch in pending.values() for r in batch])
                return True
    finally:
        stop_waiter.cancel()
        for call in pending:
            call.cancel()
        await asyncio.gather(stop_waiter, *pending, return_exceptions=True)
