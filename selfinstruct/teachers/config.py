"""Teacher settings: the `[teacher]` TOML table and the flags `--teacher`, `--model`, `--base-url`, ….

No field ever holds an API key: `api_key_env` names the environment variable the key is read from at start, so
saved configs and logs cannot leak it. vLLM-only knobs whose plain names other commands also use carry a
`--teacher-` flag prefix (`--teacher-dtype`, `--teacher-seed`) so flattened flags never clash.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from selfinstruct.config import Section


class TeacherConfig(Section):
    backend: Literal["openai", "vllm"] = Field(
        "openai",
        description="openai: any OpenAI-compatible HTTP endpoint; vllm: an in-process vLLM engine",
        json_schema_extra={"flag": "--teacher"},
    )
    model: str = Field(
        "gpt-4o-mini",
        description="model name at the endpoint; --teacher vllm: a directory, hub id, .gguf file or built-in name",
    )
    base_url: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URL(s), load-balanced; empty = api.openai.com",
    )
    api: Literal["chat", "completions"] = Field(
        "chat", description="chat: /chat/completions; completions: legacy /completions for base models"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="environment variable holding the API key (optional for local/private URLs; '' = none)",
    )
    concurrency: int | None = Field(
        None, ge=1, description="requests in flight at once, over all base URLs (default 32; vllm: 256)"
    )
    rpm: float | None = Field(None, gt=0, description="requests-per-minute limit (none = unlimited)")
    tpm: float | None = Field(
        None, gt=0, description="tokens-per-minute limit, counting estimated prompt + max_tokens × n"
    )
    max_retries: int = Field(
        6, ge=0, description="retries per request for 408/409/429/5xx, timeouts, bad bodies"
    )
    backoff: float = Field(
        1.0, gt=0, description="first retry delay in seconds; doubles per attempt (with jitter), capped at 60"
    )
    timeout: float = Field(300.0, gt=0, description="seconds one HTTP request may take before it is retried")
    request_seed: bool | None = Field(
        None,
        description="give each request its own seed (default: yes, except to a vLLM server: its CPU build "
        "crashes on seeded requests whose prompt is prefilled in chunks)",
    )
    structured_output: bool = Field(
        True, description="ask the backend to enforce a JSON schema when a pipeline supplies one"
    )
    price_input: float | None = Field(
        None, ge=0, description="USD per 1M prompt tokens (default: built-in table for known OpenAI models)"
    )
    price_output: float | None = Field(
        None,
        ge=0,
        description="USD per 1M completion tokens (default: built-in table for known OpenAI models)",
    )
    batch_api: bool = Field(
        False,
        description="openai: send stages whose requests are independent (classify, instances, alpaca rounds) "
        "as Batch API jobs at half price; results within 24 h; rerunning resumes the journaled batch",
    )
    batch_poll: float = Field(
        30.0, gt=0, description="openai --batch-api: seconds between batch status checks"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs to shard the model over")
    dtype: str = Field(
        "auto",
        description="vllm: weight/activation dtype (auto, bfloat16, float16, float32)",
        json_schema_extra={"flag": "--teacher-dtype"},
    )
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length (default: the model's)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of GPU memory (of RAM on CPU) for weights + KV cache"
    )
    enforce_eager: bool = Field(False, description="vllm: skip CUDA graphs / compilation (faster start)")
    seed: int = Field(0, description="vllm: engine seed", json_schema_extra={"flag": "--teacher-seed"})
    trust_remote_code: bool = Field(
        False,
        description="vllm: run model code shipped with the checkpoint",
        json_schema_extra={"flag": "--teacher-trust-remote-code"},
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description='vllm: extra keyword arguments for vllm.LLM, as JSON (e.g. {"max_num_seqs": 512})',
    )
    quantization: str | None = Field(
        None,
        description="vllm: quantization method (awq, gptq, fp8, …; none = from the checkpoint)",
        json_schema_extra={"flag": "--teacher-quantization"},
    )

    @property
    def in_process(self) -> bool:
        """The model runs in this process (in-process vLLM: `model` is a local path or hub id to load), rather
        than behind an HTTP endpoint; what a command checks before any teacher exists."""
        return self.backend == "vllm"

    @property
    def concurrency_or_default(self) -> int:
        """`--concurrency`, else the backend's default (an engine batches what is in flight: give it plenty)."""
        return self.concurrency or (256 if self.in_process else 32)

    @model_validator(mode="after")
    def _batch_needs_http(self) -> TeacherConfig:
        if self.batch_api and self.backend != "openai":
            raise ValueError("--batch-api needs the OpenAI-compatible teacher (--teacher openai)")
        return self

    @field_validator("base_url", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """Accept `"http://a/v1, http://b/v1"` (TOML string or env) as well as a list."""
        if isinstance(value, str):
            return [u.strip() for u in value.replace(" ", ",").split(",") if u.strip()]
        return value

    @field_validator("base_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base URL must start with http:// or https:// (got {url!r})")
        return [u.rstrip("/") for u in urls]
