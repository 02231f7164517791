"""`selfinstruct train` on the tiny local model: label masking, packing isolation, learning, resume, LoRA
save/reload/merge, loading the result in vLLM, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfinstruct import cli
from selfinstruct.errors import UserError
from selfinstruct.train import (
    TrainConfig,
    build_trainer,
    check_packing,
    format_alpaca_prompt,
    resolve_defaults,
    train,
)

WORDS = "red green blue black white pink gray gold".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Alpaca JSONL with and without inputs, outputs of varied length."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = []
    for i in range(48):
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(2 + i % 4)]
        if i % 3:
            rows.append(
                {
                    "instruction": "Reverse the words.",
                    "input": " ".join(words),
                    "output": " ".join(words[::-1]),
                }
            )
        else:
            rows.append({"instruction": f"Say the color {words[0]}.", "output": words[0], "meta": {"n": i}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(corpus: Path, model: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(data=str(corpus), model=str(model), out=str(out), batch_size=4, grad_accum=1, max_steps=4)
    return TrainConfig(**{**settings, **kw})


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_are_masked_exactly_on_prompt_and_padding(template, corpus, tiny_model_dir, tmp_path):
    trainer, cfg, n_train, _ = build_trainer(config(corpus, tiny_model_dir, tmp_path, template=template))
    tok = trainer.processing_class
    from selfinstruct.corpus import load_alpaca

    records = load_alpaca(corpus)
    assert n_train == len(records) == len(trainer.train_dataset)
    picks = [0, 1, 2, 5]  # with and without input, different lengths -> padding
    batch = trainer.data_collator([trainer.train_dataset[i] for i in picks])
    assert (batch["input_ids"] == tok.pad_token_id).any(), "the batch should contain padding"
    for row, i in enumerate(picks):
        r = records[i]
        if template == "chat":
            user = f"{r.instruction}\n\n{r.input}" if r.input else r.instruction
            prompt_ids = tok.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True
            )
            full_ids = tok.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": r.output}]
            )
            prompt_ids, full_ids = (
                list(getattr(prompt_ids, "input_ids", prompt_ids)),
                list(getattr(full_ids, "input_ids", full_ids)),
            )
        else:
            prompt_text = format_alpaca_prompt(r.instruction, r.input)
            assert prompt_text.endswith("### Response:\n") and ("### Input:" in prompt_text) == bool(r.input)
            prompt_ids = tok(prompt_text)["input_ids"]
            full_ids = tok(prompt_text + r.output + tok.eos_token)["input_ids"]
        p, n = len(prompt_ids), len(full_ids)
        assert full_ids[:p] == prompt_ids
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[:n] == full_ids
        assert labels[:p] == [-100] * p  # prompt: masked
        assert labels[p:n] == full_ids[p:n]  # completion: trained, EOS included
        assert tok.eos_token_id in labels[p:n]
        assert labels[n:] == [-100] * (len(labels) - n)  # padding: masked
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(ids) - n)
    assert cfg.template == template


def test_template_defaults_follow_the_tokenizer():
    base = TrainConfig(data="d", model="m", out="o")
    plain = resolve_defaults(base, SimpleNamespace(chat_template=None, eos_token="</s>"), False, False)
    assert (plain.template, plain.precision, plain.learning_rate, plain.gradient_checkpointing) == (
        "alpaca",
        "fp32",
        2e-5,
        False,
    )
    lora_gpu = resolve_defaults(
        base.model_copy(update={"lora": True}),
        SimpleNamespace(chat_template=None, eos_token="</s>"),
        True,
        True,
    )
    assert (lora_gpu.precision, lora_gpu.learning_rate, lora_gpu.gradient_checkpointing) == (
        "bf16",
        2e-4,
        True,
    )


# ---------------------------------------------------------------- packing


def test_packed_rows_keep_every_sample_and_its_prompt_mask(corpus, tiny_model_dir, tmp_path):
    plain, *_ = build_trainer(config(corpus, tiny_model_dir, tmp_path / "a"))
    packed, *_ = build_trainer(config(corpus, tiny_model_dir, tmp_path / "b", packing=True, max_length=256))
    singles = Counter((tuple(e["input_ids"]), tuple(e["labels"])) for e in plain.train_dataset)
    segments = Counter()
    for row in packed.train_dataset:
        start = 0
        for n in row["seq_lengths"]:
            segments[
                (tuple(row["input_ids"][start : start + n]), tuple(row["labels"][start : start + n]))
            ] += 1
            start += n
        assert start == len(row["input_ids"]) <= 256
    assert segments == singles
    assert len(packed.train_dataset) < len(plain.train_dataset) / 4


def test_packed_samples_do_not_attend_to_each_other(corpus, tiny_model_dir, tmp_path):
    """The logits of each sample inside a packed training batch equal its logits when run alone."""
    import torch

    trainer, *_ = build_trainer(config(corpus, tiny_model_dir, tmp_path, packing=True, max_length=200))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] > 1
    model = trainer.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}  # as in training
    with torch.no_grad():
        packed = model(**inputs).logits
        leaky = model(**inputs, attention_mask=torch.ones_like(batch["input_ids"])).logits  # naive packing
        worst = leak = 0.0
        checked = 0
        for row in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0 and (i + 1 < len(pos) and pos[i + 1] == 1)]
            for s in starts:
                e = s + 1
                while e < len(pos) and pos[e] == pos[e - 1] + 1:
                    e += 1
                alone = model(input_ids=batch["input_ids"][row : row + 1, s:e]).logits[0]
                worst = max(worst, (packed[row, s:e] - alone).abs().max().item())
                leak = max(leak, (leaky[row, s:e] - alone).abs().max().item())
                checked += 1
    assert checked >= 8
    assert worst < 1e-4
    assert leak > 1e-2  # the same check catches samples that see each other
    leak, drift = check_packing(trainer)
    assert leak < 1e-6 and drift < 1e-5


def test_check_packing_refuses_a_collator_that_leaks(corpus, tiny_model_dir, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer, *_ = build_trainer(config(corpus, tiny_model_dir, tmp_path, packing=True))
    # position ids restart per sample, but an all-ones attention_mask lets every token see the whole row
    trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=0, return_position_ids=True)
    with pytest.raises(UserError, match="packing is not safe"):
        check_packing(trainer)


# ---------------------------------------------------------------- training, resume, LoRA


@pytest.fixture(scope="module")
def full_run(corpus, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = config(
        corpus,
        tiny_model_dir,
        out,
        max_steps=12,
        save_steps=6,
        logging_steps=1,
        learning_rate=3e-3,
        eval_fraction=0.1,
    )
    return cfg, train(cfg)


def test_loss_goes_down_and_everything_is_saved(full_run):
    _, result = full_run
    out = Path(result.out)
    history = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]
    assert result.global_step == 12 and result.resumed_from is None
    assert result.eval_loss is not None and result.eval_loss < losses[0]
    assert (result.train_examples, result.eval_examples) == (
        46,
        2,
    )  # 1 of 9 tasks: both "Say the color black."
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "train_config.toml",
        "train_summary.json",
    ):
        assert (out / name).is_file(), name
    saved = (out / "train_config.toml").read_text()
    assert 'template = "chat"' in saved and "learning_rate = 0.003" in saved and 'precision = "fp32"' in saved
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 12


def test_rerun_resumes_from_the_last_checkpoint(full_run):
    cfg, first = full_run
    out = Path(first.out)
    before = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    result = train(cfg.model_copy(update={"max_steps": 15}))
    assert result.resumed_from == str(out / "checkpoint-12")
    assert result.global_step == 15
    after = json.loads((out / "checkpoint-15" / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in after if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(1, 16))
    assert train_logs[:12] == [
        h for h in before if "loss" in h
    ]  # carried over from the checkpoint, not redone


def test_lora_adapter_saves_reloads_and_merges(corpus, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(
        config(corpus, tiny_model_dir, tmp_path, lora=True, merge=True, max_steps=6, learning_rate=1e-2)
    )
    out = Path(result.out)
    assert result.saved == "adapter" and result.merged == str(out / "merged")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        adapted_logits = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        merged_logits = merged(input_ids=ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-4)
    assert (out / "merged" / "tokenizer.json").is_file()


@pytest.mark.vllm
def test_trained_model_loads_and_generates_in_vllm(full_run, tmp_path):
    _, result = full_run
    script = tmp_path / "gen.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            from vllm import LLM, SamplingParams

            if __name__ == "__main__":
                llm = LLM(model=sys.argv[1], dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True,
                          max_model_len=512)
                outs = llm.chat([[{"role": "user", "content": "Reverse the words.\\n\\nred blue"}]],
                                SamplingParams(max_tokens=8, temperature=0.0))
                print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), result.out], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    (token_ids,) = json.loads(line[len("RESULT ") :])
    assert len(token_ids) >= 1


# ---------------------------------------------------------------- bad inputs: one line, exit 2


def run_main(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_exit_2(capsys, corpus, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "no output"}\n')
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    model, out = str(tiny_model_dir), str(tmp_path / "out")
    cases = [
        (["--data", str(empty), "--model", model, "--out", out], "empty.jsonl: file is empty"),
        (["--data", str(missing), "--model", model, "--out", out], "missing.jsonl:2: field 'output'"),
        (["--data", str(chat), "--model", model, "--out", out], "chat.jsonl:1: a chat record must end with"),
        (["--data", str(tmp_path), "--model", model, "--out", out], "no corpus.jsonl in this run directory"),
        (["--data", str(corpus), "--model", str(tmp_path / "nope"), "--out", out], "nope: no such directory"),
        (["--data", str(corpus), "--model", str(tmp_path), "--out", out], "no config.json in that directory"),
        (["--data", str(corpus), "--model", model, "--out", out, "--qlora"], "--qlora needs a CUDA GPU"),
        (
            ["--data", str(corpus), "--model", model, "--out", out, "--merge"],
            "--merge only applies to --lora",
        ),
        (["--data", str(corpus), "--model", model, "--out", out, "--eval-fraction", "2"], "eval_fraction"),
        (["--model", model, "--out", out], "train needs --data"),
    ]
    for args, message in cases:
        assert message in run_main(capsys, *args), args


def test_unknown_hub_id_offline_and_unknown_option_fail_fast(corpus, tmp_path):
    env_cmd = [
        sys.executable,
        "-m",
        "selfinstruct.cli",
        "train",
        "--data",
        str(corpus),
        "--out",
        str(tmp_path),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        [*env_cmd, "--model", "no-such-org/no-such-model"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no-such-org/no-such-model: cannot load" in proc.stderr
    assert time.monotonic() - started < 60
    proc = subprocess.run(
        [*env_cmd, "--model", "x", "--lora-rank", "8"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unrecognized arguments: --lora-rank" in proc.stderr
    assert "Traceback" not in proc.stderr
