"""`--batch-api`: run a teacher stage as Batch API jobs (half price, answers within 24 h), resumable.

A stage whose requests do not depend on each other's answers (classify, instances: one request per
instruction; alpaca and bootstrap rounds: prompts built from the pool as it stands when the batch is made) hands
all it would send to one batch instead of keeping `--concurrency` requests in flight. The stage's own request
builder and answer handler are used unchanged (`next_call` / `handle`), so records are the same as in a direct run.

What the run directory holds, and why a restart never pays twice:
1. the requests of a batch go to `batches/<label>.jsonl` (atomically) and a `prepared` line to `batches.jsonl`;
2. the file is uploaded and the batch created, with `<label>` in its metadata; a `submitted` line journals its id;
3. the batch is polled until it ends; its output and error files are downloaded and every answer goes through
   the stage's handler (journaled like a direct answer); once they are durable a `finished` line follows.
A rerun first completes what the journal left open: a submitted batch is polled again, never resubmitted; a
prepared one whose id was lost (killed between create and journal) is looked up by its label in the provider's
batch list and created only if it is not there. Answers for instructions that already have one are dropped.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.pipeline import RunContext, read_keyed
from selfinstruct.pipeline.runner import Journal
from selfinstruct.store import JsonlWriter, RunDir, atomic_write_text, read_jsonl
from selfinstruct.teachers.base import Sampling, TeacherRequest, TeacherResponse

BATCHES = "batches.jsonl"
BATCH_DIR = "batches"
ENDED = {"completed", "failed", "expired", "cancelled"}


@dataclass
class BatchScope:
    """What batching needs from the command running a stage: its run directory and journal (answers must be
    durable before a batch counts as finished), the teacher, the stop event, the poll interval, and where to
    show a batch's progress."""

    run: RunDir
    teacher: Any
    journal: Journal
    stop: asyncio.Event
    poll: float
    info: dict[str, Any] = field(default_factory=dict)
    on_tick: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, ctx: RunContext, stage: str) -> BatchScope:
        return cls(
            ctx.run,
            ctx.teacher,
            ctx.journal,
            ctx.stop,
            ctx.cfg.teacher.batch_poll,
            ctx.stats[stage].extra,
            lambda: ctx.on_tick(stage),
        )


class BatchLog:
    """`batches.jsonl`: prepared / submitted / finished lines, appended with an fsync each."""

    def __init__(self, scope: BatchScope):
        self.path = scope.run / BATCHES

    def unfinished(self, stage: str) -> list[dict[str, Any]]:
        """Batches of `stage` prepared but not finished, in order, with their id when one was journaled."""
        open_: dict[str, dict[str, Any]] = {}
        for line in read_jsonl(self.path) if self.path.exists() else []:
            if line.get("stage") != stage:
                continue
            if line["event"] == "prepared":
                open_[line["label"]] = dict(line)
            elif line["event"] == "submitted" and line["label"] in open_:
                open_[line["label"]]["batch_id"] = line["batch_id"]
            elif line["event"] == "finished":
                open_.pop(line["label"], None)
        return list(open_.values())

    def append(self, **line: Any) -> None:
        with JsonlWriter(self.path) as writer:
            writer.write([line])


def _encode(request: TeacherRequest) -> str:
    """One request as a line of the batch's request file. A tag that is not JSON (a live object) cannot be
    restored by another process: the line says so and a rerun drops its answer."""
    data = {
        "messages": request.messages,
        "prompt": request.prompt,
        "sampling": asdict(request.sampling),
        "marker": request.marker,
    }
    try:
        return json.dumps({**data, "tag": request.tag}, ensure_ascii=False)
    except TypeError:
        return json.dumps({**data, "tag": None, "opaque_tag": True}, ensure_ascii=False)


def _decode(data: dict[str, Any]) -> TeacherRequest | None:
    if data.get("opaque_tag"):
        return None
    sampling = Sampling(**data["sampling"])
    return TeacherRequest(data["messages"], data["prompt"], sampling, data["tag"], data.get("marker"))


async def run_batches(ctx: BatchScope, stage: str, source: Any) -> bool:
    """Drive `source` (the same object `drive` takes) through batches; False when stopped (Ctrl-C)."""
    if not hasattr(ctx.teacher, "submit_batch"):
        raise UserError("--batch-api needs the OpenAI-compatible teacher (--teacher openai)")
    log = BatchLog(ctx)
    for entry in log.unfinished(stage):
        if not await _finish(ctx, stage, source, log, entry):
            return False
    _dedupe_todo(source)
    while not ctx.stop.is_set() and not source.satisfied():
        requests: list[TeacherRequest] = []
        while batch := source.next_call(len(requests)):
            requests += batch
        if not requests:
            break
        label = f"{stage}-{uuid.uuid4().hex[:12]}"
        atomic_write_text(
            ctx.run / BATCH_DIR / f"{label}.jsonl", "".join(_encode(r) + "\n" for r in requests)
        )
        log.append(stage=stage, label=label, requests=len(requests), event="prepared")
        if not await _finish(ctx, stage, source, log, {"stage": stage, "label": label}, requests):
            return False
        _dedupe_todo(source)
    return not ctx.stop.is_set()


async def _finish(
    ctx: BatchScope,
    stage: str,
    source: Any,
    log: BatchLog,
    entry: dict[str, Any],
    made: list[TeacherRequest] | None = None,
) -> bool:
    """Submit (unless already), poll, download and hand over one batch. False when stopped while waiting.

    `made`: the requests, when this process built the batch (else they are read back from its file)."""
    teacher: Any = ctx.teacher
    label = entry["label"]
    stored = made or [_decode(d) for d in read_jsonl(ctx.run / BATCH_DIR / f"{label}.jsonl")]
    requests = {f"r{k}": r for k, r in enumerate(stored) if r is not None}
    batch_id = entry.get("batch_id")
    if batch_id is None:
        if len(requests) < len(stored):  # never sent, and its answers could not be used: build anew
            log.append(stage=stage, label=label, event="finished", status="abandoned")
            return True
        batch_id = await teacher.find_batch(label) or await teacher.submit_batch(
            list(requests.values()), list(requests), label
        )
        log.append(stage=stage, label=label, batch_id=batch_id, event="submitted")
    while True:
        batch = await teacher.batch_status(batch_id)
        counts = batch.request_counts
        ctx.info["batch"] = {
            "id": batch_id,
            "status": batch.status,
            "completed": counts.completed if counts else 0,
            "total": counts.total if counts else len(requests),
        }
        ctx.on_tick()
        if batch.status in ENDED:
            break
        try:
            await asyncio.wait_for(ctx.stop.wait(), timeout=ctx.poll)
            return False  # stopped: the batch runs on at the provider; a rerun picks it up
        except TimeoutError:
            pass
    responses = await teacher.batch_results(batch, requests)
    if not responses and batch.status == "failed":
        log.append(stage=stage, label=label, batch_id=batch_id, event="finished", status=batch.status)
        errors = "; ".join(e.message or "?" for e in (batch.errors.data or [])) if batch.errors else ""
        raise UserError(f"batch {batch_id} failed: {errors or 'no reason given'}; rerun to submit it again")
    await ctx.journal.aflush()
    try:
        source.handle(_still_wanted(source, responses))
    except UserError:  # answers that stop the run (a failed calibration, every line refused) would stop a
        await ctx.journal.aflush()  # rerun that took this batch up again the same way: it asks anew instead
        log.append(stage=stage, label=label, batch_id=batch_id, event="finished", status="unusable")
        raise
    await ctx.journal.aflush()
    log.append(stage=stage, label=label, batch_id=batch_id, event="finished", status=batch.status)
    return True


def _still_wanted(source: Any, responses: list[TeacherResponse]) -> list[TeacherResponse]:
    """Per-instruction stages: only answers about instructions still without one (a rerun may hold some)."""
    output, ctx = getattr(source, "output", None), getattr(source, "ctx", None)
    if output is None or ctx is None:
        return responses
    done = read_keyed(ctx.run, output)
    return [r for r in responses if r.request.tag[0] not in done]


def _dedupe_todo(source: Any) -> None:
    """Drop from a per-instruction stage's to-do list what a resumed batch answered, and repeats (a failed
    answer queues its instruction once more)."""
    todo, output = getattr(source, "todo", None), getattr(source, "output", None)
    if todo is None or output is None:
        return
    done = read_keyed(source.ctx.run, output)
    seen: set[str] = set()
    keep = []
    for item in todo:
        if item[0] not in done and item[0] not in seen:
            seen.add(item[0])
            keep.append(item)
    source.todo = deque(keep)
