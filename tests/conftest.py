"""Session fixtures shared by the test files: built once, because each costs seconds to tens of seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on CPU: reserve 1 GiB of KV cache instead of most of the RAM; set before any vLLM import.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama + tokenizer + chat template, built locally (no hub)."""
    from selfinstruct.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
