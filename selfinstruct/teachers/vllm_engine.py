"""Teacher backend that runs vLLM in this process (`vllm.LLM`), for users with their own GPU(s).

The engine is built once in `start()`. Each `generate()` hands the whole batch to vLLM at once, one
`LLM.generate` call for raw prompts and one `LLM.chat` call for chat messages, so vLLM's scheduler sees every
prompt of a round and keeps the GPU full. `Sampling` maps 1:1 onto `SamplingParams` (`max_tokens` always
explicit: vLLM's own default is 16).

vLLM's offline API is blocking and not thread-safe, so every engine call runs on one dedicated worker thread:
the event loop stays free (progress bars, other teachers) and calls never overlap. vLLM is imported there,
lazily, so the rest of the tool works without it. The engine spawns worker processes, so a script that starts
this teacher needs an `if __name__ == "__main__":` guard.

Structured output uses `StructuredOutputsParams(json=schema)` with vLLM's automatic choice of grammar backend.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.models import resolve_model
from selfinstruct.teachers.base import Choice, Teacher, TeacherRequest, TeacherResponse, Usage
from selfinstruct.teachers.config import TeacherConfig
from selfinstruct.teachers.pricing import cost

DEFAULT_CONCURRENCY = 256  # vLLM batches internally; pipelines should hand it big rounds


class VLLMTeacher(Teacher):
    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg, DEFAULT_CONCURRENCY)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-teacher")
        self._llm: Any = None
        self._model_path = self.model  # what vLLM loads: `model` resolved by `selfinstruct.models`

    async def _in_engine_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._llm is None:
            # a GGUF file or adapter is converted first (once, cached): in the engine thread, off the event loop
            self._model_path = await self._in_engine_thread(
                lambda: resolve_model(
                    self.model, "teacher model", trust_remote_code=self.cfg.trust_remote_code
                )
            )
            self._llm = await self._in_engine_thread(self._build)

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
        if self._llm is not None:
            await self._in_engine_thread(self._drop_engine)
        self._executor.shutdown(wait=True)

    def _drop_engine(self) -> None:
        """Stop the engine's processes now, not at interpreter exit (when logging has already shut down)."""
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        self._llm = None
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        gc.collect()

    # -- generation ----------------------------------------------------------------------------------------
    async def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResponse]:
        if self._llm is None:
            await self.start()
        responses: list[TeacherResponse] = await self._in_engine_thread(self._generate, list(requests))
        for r in responses:
            self._account(r)
        return responses

    def _generate(self, requests: list[TeacherRequest]) -> list[TeacherResponse]:
        responses: list[TeacherResponse | None] = [None] * len(requests)
        params: dict[int, Any] = {}
        for i, request in enumerate(requests):
            try:
                params[i] = self._sampling_params(request)
            except ValueError as exc:  # vLLM validates parameters as they are built
                responses[i] = TeacherResponse(request, error=f"invalid sampling parameters: {exc}")
        chat = [i for i in params if requests[i].messages is not None]
        raw = [i for i in params if requests[i].messages is None]
        if chat:
            self._check_chat_template()
            self._run(self._llm.chat, [requests[i].messages for i in chat], chat, requests, params, responses)
        if raw:
            self._run(self._llm.generate, [requests[i].prompt for i in raw], raw, requests, params, responses)
        return responses  # type: ignore[return-value]  # every slot is filled

    def _run(
        self,
        call: Any,
        inputs: list[Any],
        indices: list[int],
        requests: list[TeacherRequest],
        params: dict[int, Any],
        responses: list[TeacherResponse | None],
    ) -> None:
        """One engine call for the whole group; if vLLM rejects it (one prompt too long, …), find which."""
        from vllm.exceptions import VLLMClientError

        try:
            outputs = call(inputs, [params[i] for i in indices], use_tqdm=False)
        except (VLLMClientError, ValueError):
            outputs = []
            for i, item in zip(indices, inputs, strict=True):
                try:
                    outputs.extend(call([item], [params[i]], use_tqdm=False))
                except (VLLMClientError, ValueError) as exc:
                    outputs.append(exc)
        for i, out in zip(indices, outputs, strict=True):
            responses[i] = self._response(requests[i], out)

    def _check_chat_template(self) -> None:
        if not getattr(self._llm.get_tokenizer(), "chat_template", None):
            raise UserError(
                f"teacher model {self.model} has no chat template: use raw prompts (api = completions)"
            )

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
            seed=s.seed,
            structured_outputs=StructuredOutputsParams(json=s.json_schema) if structured else None,
        )

    def _response(self, request: TeacherRequest, out: Any) -> TeacherResponse:
        if isinstance(out, Exception):
            return TeacherResponse(request, error=f"vLLM rejected the request: {out}")
        copies = request.sampling.n if request.sampling.temperature == 0 else 1
        choices = [Choice(c.text, c.finish_reason) for _ in range(copies) for c in out.outputs]
        completion_tokens = copies * sum(len(c.token_ids) for c in out.outputs)
        usage = Usage(len(out.prompt_token_ids or []), completion_tokens)
        structured = self.cfg.structured_output and request.sampling.json_schema is not None
        return TeacherResponse(request, choices, usage, structured=structured)

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
