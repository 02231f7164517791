"""Teacher backend that runs vLLM in this process (`vllm.LLM`), for users with their own GPU(s).

One engine thread owns the engine (vLLM's offline API is not thread-safe): it adds the requests that arrive,
runs `LLMEngine.step()` while any are unfinished, and hands each answer back the moment vLLM finishes it. So
the engine batches everything in flight (continuous batching, as behind an HTTP server), a pipeline sees
answers, progress and journal records as they come rather than when a whole round ends, and a request given
up on (Ctrl-C, SIGTERM) is aborted between two steps instead of running to the end. `Sampling` maps 1:1 onto
`SamplingParams` (`max_tokens` always explicit: vLLM's own default is 16; `logprobs` are the model's raw ones,
before temperature or penalties, at most the engine's `max_logprobs`, 20 by default).

vLLM is imported in the engine thread, lazily, so the rest of the tool works without it. The engine spawns
worker processes, so a script that starts this teacher needs an `if __name__ == "__main__":` guard, and
`close()` shuts them down (`engine_core.shutdown()`) rather than leaving that to interpreter exit.

Structured output uses `StructuredOutputsParams(json=schema)` with vLLM's automatic choice of grammar backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.models import resolve_model
from selfinstruct.teachers.base import Choice, Teacher, TeacherRequest, TeacherResponse, Usage
from selfinstruct.teachers.config import TeacherConfig
from selfinstruct.teachers.pricing import cost

SHUTDOWN_GRACE_S = 1.0
"""Seconds the engine's processes get to exit after SIGTERM before they are killed (vLLM's default: 5)."""
CLOSE_WAIT_S = 0.5
"""Seconds `close()` waits for the engine thread to finish its step before it stops the engine itself."""


@dataclass(eq=False)
class _Job:
    """One request on its way through the engine, and where its answer goes."""

    request: TeacherRequest
    future: asyncio.Future[TeacherResponse]
    loop: asyncio.AbstractEventLoop


def _children() -> dict[int, Any]:
    """This process's descendants by pid (psutil handles: they remember their start time, so a reused pid is
    never mistaken for the process it was)."""
    import psutil  # a dependency of vLLM

    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _reap(procs: list[Any], grace: float) -> None:
    """Terminate, then kill, those of `procs` still running."""
    import psutil

    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()  # psutil checks that it is still the same process first
            alive.append(proc)
    for proc in psutil.wait_procs(alive, timeout=grace)[1]:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _first_top(logprobs: Any) -> dict[str, float] | None:
    """{token text: logprob} of the first generated position (vLLM: a list of {token id: Logprob} per position,
    the top k plus the sampled token)."""
    if not logprobs:
        return None
    return {lp.decoded_token: lp.logprob for lp in logprobs[0].values() if lp.decoded_token is not None}


class VLLMTeacher(Teacher):
    in_process = True
    supports_logprobs = True

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        self._llm: Any = None
        self._model_path = self.model  # what vLLM loads: `model` resolved by `selfinstruct.models`
        self._engine_procs: list[Any] = []  # the processes building the engine started (and only those)
        self._chat_template = False
        self._inbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] | None = None
        self._jobs: dict[str, _Job] = {}  # engine thread only: vLLM's request id -> job
        self._dead: str | None = None  # engine thread only: why the engine stopped answering
        self._core: Any = None  # the engine's process client, to shut down (its shutdown runs once)

    @property
    def honours_per_request_seed(self) -> bool:
        """No: per-request seeds crash vLLM's CPU build ("CPU Generator does not use offset" once a prompt is
        prefilled in chunks); the engine seed (`--teacher-seed`) seeds the run instead."""
        return False

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            # a GGUF file or adapter is converted first (once, cached), off the event loop
            self._model_path = await asyncio.to_thread(
                resolve_model, self.model, "teacher model", trust_remote_code=self.cfg.trust_remote_code
            )
            self._ready = concurrent.futures.Future()
            self._thread = threading.Thread(target=self._serve, name="vllm-teacher", daemon=True)
            self._thread.start()
        assert self._ready is not None
        await asyncio.wrap_future(self._ready)

    def _build(self) -> Any:
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("--teacher vllm needs vLLM: pip install 'selfinstruct[vllm]'") from None
        c = self.cfg
        kwargs: dict[str, Any] = {
            "model": self._model_path,
            "tensor_parallel_size": c.tensor_parallel_size,
            "dtype": c.dtype,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "enforce_eager": c.enforce_eager,
            "seed": c.seed,
            "trust_remote_code": c.trust_remote_code,
        }
        if c.max_model_len is not None:
            kwargs["max_model_len"] = c.max_model_len
        if c.quantization is not None:
            kwargs["quantization"] = c.quantization
        kwargs.update(c.engine_args)
        try:
            return LLM(**kwargs)
        except Exception as exc:  # OOM, unknown architecture, bad dtype, …: the user's to fix
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"vLLM could not load teacher model {c.model}: {first_line}") from exc

    async def close(self) -> None:
        """Abort what is still running, stop the engine's processes and the engine thread.

        The engine thread normally ends within a step. If it does not, it is waiting on an engine that died
        without a word (its processes got the terminal's Ctrl-C too): stop the processes from here and leave
        the (daemon) thread behind rather than make the user wait.
        """
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join, CLOSE_WAIT_S)
            if self._thread.is_alive() and self._core is not None:
                await asyncio.to_thread(self._core.shutdown, SHUTDOWN_GRACE_S)
            self._thread = None
            # A Ctrl-C to the terminal's process group reaches the engine's processes too and can leave one
            # half-stopped: whatever the engine started and is still running goes now (and nothing else).
            await asyncio.to_thread(_reap, self._engine_procs, SHUTDOWN_GRACE_S)

    # -- generation (event loop side) ----------------------------------------------------------------------
    async def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResponse]:
        """Answers in request order; cancelling the call aborts its unfinished requests in the engine."""
        await self.start()
        if not self._chat_template and any(r.messages is not None for r in requests):
            raise UserError(
                f"teacher model {self.model} has no chat template: use raw prompts (api = completions)"
            )
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, loop.create_future(), loop) for r in requests]
        self._inbox.put(("add", jobs))
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except asyncio.CancelledError:
            abandoned = {job.future for job in jobs if job.future.cancelled()}
            self.stats.requests += len(abandoned)  # given up (Ctrl-C, target reached): sent, so they count
            self._inbox.put(("abort", abandoned))
            raise

    def _deliver(self, job: _Job, response: TeacherResponse) -> None:
        """Called on the event loop: count the answer and resolve its future, unless it was given up."""
        if not job.future.done():
            self._account(response)
            job.future.set_result(response)

    def _account(self, response: TeacherResponse) -> None:
        s = self.stats
        s.requests += 1
        if response.error:
            s.failed_requests += 1
            s.errors_by_kind["rejected"] = s.errors_by_kind.get("rejected", 0) + 1
            return
        response.cost = cost(response.usage, self.prices)
        s.prompt_tokens += response.usage.prompt_tokens
        s.completion_tokens += response.usage.completion_tokens
        s.cost += response.cost

    # -- the engine thread ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Build the engine, then add / abort / step until `close()`; shut the engine down on the way out."""
        assert self._ready is not None
        try:
            before = _children()
            self._llm = self._build()
            self._engine_procs = [p for pid, p in _children().items() if pid not in before]
            self._core = self._llm.llm_engine.engine_core
            self._chat_template = bool(getattr(self._llm.get_tokenizer(), "chat_template", None))
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        engine = self._llm.llm_engine
        try:
            while True:
                busy = self._dead is None and engine.has_unfinished_requests()
                commands = [] if busy else [self._inbox.get()]  # idle: sleep until there is work
                while not self._inbox.empty():
                    commands.append(self._inbox.get_nowait())
                for command in commands:
                    if command is None:
                        return
                    kind, arg = command
                    if kind == "add":
                        for job in arg:
                            self._add(job)
                    else:
                        self._abort(arg)
                if self._dead is None and engine.has_unfinished_requests():
                    self._step(engine)
        finally:
            self._fail_all("the teacher was closed")
            self._drop_engine()

    def _add(self, job: _Job) -> None:
        from vllm.exceptions import VLLMClientError

        if self._dead is not None:
            self._send(job, TeacherResponse(job.request, error=self._dead))
            return
        request = job.request
        try:
            params = self._sampling_params(request)
        except ValueError as exc:  # vLLM validates parameters as they are built
            self._send(job, TeacherResponse(request, error=f"invalid sampling parameters: {exc}"))
            return
        try:
            if request.messages is not None:
                [request_id] = self._llm.enqueue_chat([request.messages], params, use_tqdm=False)
            else:
                [request_id] = self._llm.enqueue([request.prompt], params, use_tqdm=False)
        except (VLLMClientError, ValueError) as exc:  # a prompt longer than the context, …
            self._send(job, TeacherResponse(request, error=f"vLLM rejected the request: {exc}"))
            return
        # enqueue returns the internal id "<our id>-<random suffix>"; outputs carry the part before the dash
        self._jobs[request_id.split("-", 1)[0]] = job

    def _abort(self, futures: set[asyncio.Future[TeacherResponse]]) -> None:
        ids = [rid for rid, job in self._jobs.items() if job.future in futures]
        if ids and self._dead is None:
            self._llm.llm_engine.abort_request(ids)
        for rid in ids:
            del self._jobs[rid]

    def _step(self, engine: Any) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:  # the engine process died (crash, or it got the terminal's Ctrl-C too)
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self._dead = f"the vLLM engine stopped: {first_line}"
            self._fail_all(self._dead)
            return
        for out in outputs:
            job = self._jobs.pop(out.request_id, None) if out.finished else None
            if job is not None:
                self._send(job, self._response(job.request, out))

    def _send(self, job: _Job, response: TeacherResponse) -> None:
        with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody waits for the answer
            job.loop.call_soon_threadsafe(self._deliver, job, response)

    def _fail_all(self, why: str) -> None:
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            self._send(job, TeacherResponse(job.request, error=why))

    def _drop_engine(self) -> None:
        """Stop the engine's processes now, not at interpreter exit (when logging has already shut down)."""
        self._llm = None
        if self._core is not None:
            self._core.shutdown(SHUTDOWN_GRACE_S)
        gc.collect()

    def _sampling_params(self, request: TeacherRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = request.sampling
        structured = self.cfg.structured_output and s.json_schema is not None
        return SamplingParams(
            # vLLM refuses n > 1 with greedy decoding; the n answers would be identical, so ask once.
            n=1 if s.temperature == 0 else s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=s.stop or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            min_p=s.min_p,
            seed=s.seed,
            logprobs=s.logprobs,
            structured_outputs=StructuredOutputsParams(json=s.json_schema) if structured else None,
        )

    def _response(self, request: TeacherRequest, out: Any) -> TeacherResponse:
        copies = request.sampling.n if request.sampling.temperature == 0 else 1
        choices = [
            Choice(c.text, c.finish_reason, _first_top(c.logprobs))
            for _ in range(copies)
            for c in out.outputs
        ]
        completion_tokens = copies * sum(len(c.token_ids) for c in out.outputs)
        usage = Usage(len(out.prompt_token_ids or []), completion_tokens)
        structured = self.cfg.structured_output and request.sampling.json_schema is not None
        return TeacherResponse(request, choices, usage, structured=structured)
