"""Test doubles and settings that ship with the package, so tests and benchmarks of every stage reuse them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfinstruct.teachers.config import TeacherConfig
from selfinstruct.testing.fake_openai import FakeOpenAI, Received, Reply

__all__ = ["FakeOpenAI", "Received", "Reply", "tiny_vllm_config"]


def tiny_vllm_config(model_dir: str | Path, **overrides: Any) -> TeacherConfig:
    """In-process vLLM teacher settings that run a `selfinstruct.tinymodel` model on a CPU.

    Also set `VLLM_CPU_KVCACHE_SPACE=1` in the environment before vLLM starts, or it reserves most of the RAM.
    """
    settings: dict[str, Any] = {
        "backend": "vllm",
        "model": str(model_dir),
        "dtype": "float32",
        "gpu_memory_utilization": 0.1,
        "enforce_eager": True,
        "max_model_len": 4096,
        # compact JSON under a schema: a random-weight model otherwise emits whitespace until max_tokens
        "engine_args": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}},
    }
    return TeacherConfig(**{**settings, **overrides})
