"""`train --method dpo` and `evaluate --prefs`: a learning test that can fail (DPO on a synthetic preference task
whose chosen answer is checkably correct must raise held-out preference accuracy far above its base), the
LoRA path with TRL's implicit reference, and bad preference files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from selfinstruct.config import load_toml
from selfinstruct.errors import UserError
from selfinstruct.evaluate import EvaluateConfig, evaluate
from selfinstruct.tinymodel import build_tiny_model
from selfinstruct.train import TrainConfig, load_prefs, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def number_pair(rng: random.Random, numbers: list[int]) -> dict:
    """ "Write a number greater/smaller than 50": the chosen answer is right, the rejected one is not."""
    side = rng.choice(["greater", "smaller"])
    high, low = rng.choice([n for n in numbers if n > 50]), rng.choice([n for n in numbers if n < 50])
    right, wrong = (high, low) if side == "greater" else (low, high)
    return {
        "prompt": [{"role": "user", "content": f"Write a number {side} than 50."}],
        "chosen": [{"role": "assistant", "content": str(right)}],
        "rejected": [{"role": "assistant", "content": str(wrong)}],
        "score_chosen": 5.0,
        "score_rejected": 1.0,
        "meta": {"rubric": "synthetic"},
    }


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_raises_held_out_preference_accuracy(tmp_path):
    rng = random.Random(0)
    numbers = [n for n in range(10, 100) if n != 50]
    unseen = [n for n in numbers if n % 10 == 7]  # held-out pairs use only numbers never seen in training
    train_pairs = write(
        tmp_path / "train.jsonl", [number_pair(rng, [n for n in numbers if n % 10 != 7]) for _ in range(800)]
    )
    heldout = write(tmp_path / "heldout.jsonl", [number_pair(rng, unseen) for _ in range(100)])
    # a tokenizer without number merges: numbers are digit sequences, so unseen numbers are made of seen digits
    texts = [f"user\nassistant\nWrite a number {s} than fifty." for s in ("greater", "smaller")] * 100
    base = build_tiny_model(tmp_path / "base", texts=texts, vocab_size=300)

    result = train(
        TrainConfig(
            method="dpo",
            data=str(train_pairs),
            model=str(base),
            out=str(tmp_path / "dpo"),
            batch_size=8,
            grad_accum=1,
            max_steps=100,
            learning_rate=1e-3,  # a random-init toy model; real models use the 5e-7 / 5e-6 defaults
            warmup_ratio=0.05,
            max_length=64,
            save_steps=10_000,
            logging_steps=50,
            seed=0,
        )
    )
    assert result.global_step == 100 and result.saved == "model"
    # the base is found through train_config.toml, as for SFT
    report = evaluate(EvaluateConfig(model=result.out, prefs=str(heldout), out=str(tmp_path / "eval")))
    prefs = report["preferences"]
    print(
        f"held-out preference accuracy: base {prefs['base']['accuracy']:.0%}, tuned {prefs['tuned']['accuracy']:.0%}"
    )
    assert report["models"] == {"tuned": result.out, "base": str(base)}
    assert prefs["pairs"] == 100
    assert prefs["base"]["accuracy"] <= 0.7  # a random model has no idea (0.46 measured)
    assert prefs["tuned"]["accuracy"] >= 0.9  # 1.0 measured
    assert prefs["tuned"]["margin"] > prefs["base"]["margin"]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["preferences"] == prefs
    assert "accuracy, summed log-lik." in (tmp_path / "eval" / "eval.md").read_text()


def test_dpo_with_lora_uses_the_implicit_reference_and_its_default_rate(tmp_path, tiny_model_dir):
    rng = random.Random(1)
    pairs = write(tmp_path / "prefs.jsonl", [number_pair(rng, list(range(10, 100))) for _ in range(16)])
    result = train(
        TrainConfig(
            method="dpo",
            data=str(pairs),
            model=str(tiny_model_dir),
            out=str(tmp_path / "lora"),
            lora=True,
            batch_size=4,
            grad_accum=1,
            max_steps=3,
            eval_fraction=0.25,
            save_steps=10_000,
        )
    )
    assert result.saved == "adapter" and (Path(result.out) / "adapter_config.json").is_file()
    assert result.eval_loss is not None and result.eval_examples > 0
    saved = load_toml(Path(result.out) / "train_config.toml")["train"]
    assert saved["method"] == "dpo" and saved["learning_rate"] == 5e-6 and saved["beta"] == 0.1


def test_bad_preference_files_name_the_line(tmp_path):
    good = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
    }
    bad = write(
        tmp_path / "bad.jsonl", [{**good, "rejected": [{"role": "assistant", "content": "Hey"}]}, good]
    )
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'rejected'"):
        load_prefs(str(bad))
    empty = {**good, "rejected": [{"role": "assistant", "content": " "}]}
    with pytest.raises(UserError, match=r":1: 'rejected' must be one non-empty assistant message"):
        load_prefs(str(write(tmp_path / "empty.jsonl", [empty])))
    with pytest.raises(UserError, match=r"no prefs\.jsonl"):
        load_prefs(str(tmp_path))
    with pytest.raises(UserError, match="--packing applies to --method sft only"):
        train(TrainConfig(method="dpo", data=str(bad), model="m", out=str(tmp_path / "o"), packing=True))
