"""`train --method dpo` and `evaluate --prefs`: a learning test that can fail (DPO on a synthetic preference task
whose chosen answer is checkably correct must raise held-out preference accuracy far above its base), the
LoRA path with TRL's implicit reference, an explicit `--ref-model` (full and LoRA), pairs cut by
`--max-length`, QLoRA without CUDA, and bad preference files or reference models."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.config import load_toml
from selfinstruct.errors import UserError
from selfinstruct.evaluate import EvaluateConfig, evaluate
from selfinstruct.tinymodel import build_tiny_model
from selfinstruct.train import TrainConfig, build_dpo_trainer, load_prefs, train

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


def one_step(tmp_path: Path, model: Path, pairs: Path, name: str, **options) -> float:
    """The loss of one DPO step, logged from the forward pass before the update: the policy as it starts."""
    result = train(
        TrainConfig(
            method="dpo",
            data=str(pairs),
            model=str(model),
            out=str(tmp_path / name),
            batch_size=4,
            grad_accum=1,
            max_steps=1,
            logging_steps=1,
            save_steps=10_000,
            **options,
        )
    )
    assert result.global_step == 1 and result.train_loss is not None
    return result.train_loss


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_explicit_reference_model_is_the_one_scored_against(tmp_path, tiny_model_dir, lora):
    """At step 1 the policy is its starting model. Against the implicit reference (that same model, or with LoRA
    the base with the new adapter off) every log-ratio is 0 and the sigmoid loss is exactly ln 2; against a
    different `--ref-model` it is not, so that model, and not the implicit one, is the reference (with LoRA TRL
    keeps the explicit model instead of switching the adapter off)."""
    rng = random.Random(2)
    pairs = write(tmp_path / "prefs.jsonl", [number_pair(rng, list(range(10, 100))) for _ in range(8)])
    other = build_tiny_model(tmp_path / "other", seed=1)  # same tokenizer, other random weights
    implicit = one_step(tmp_path, tiny_model_dir, pairs, "implicit", lora=lora)
    explicit = one_step(tmp_path, tiny_model_dir, pairs, "explicit", lora=lora, ref_model=str(other))
    print(
        f"step-1 DPO loss ({'lora' if lora else 'full'}): implicit ref {implicit:.6f}, --ref-model {explicit:.6f}"
    )
    assert implicit == pytest.approx(math.log(2), abs=1e-4)
    assert abs(explicit - math.log(2)) > 1e-2


def test_explicit_reference_holds_the_given_weights(tmp_path, tiny_model_dir):
    rng = random.Random(3)
    pairs = write(tmp_path / "prefs.jsonl", [number_pair(rng, list(range(10, 100))) for _ in range(4)])
    other = build_tiny_model(tmp_path / "other", seed=1)
    trainer, cfg, _, _ = build_dpo_trainer(
        TrainConfig(
            method="dpo",
            data=str(pairs),
            model=str(tiny_model_dir),
            out=str(tmp_path / "o"),
            ref_model=str(other),
        )
    )
    from safetensors.torch import load_file

    saved = load_file(str(other / "model.safetensors"))
    ref = trainer.accelerator.unwrap_model(trainer.ref_model).state_dict()
    policy = trainer.model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(ref[k].equal(v) for k, v in saved.items())
    assert not policy[name].equal(ref[name])  # the policy is --model, the reference is not
    assert cfg.ref_model == str(other)


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(tmp_path, tiny_model_dir):
    """TRL (>= 1) has no separate prompt length: a pair whose prompt alone reaches `--max-length` is dropped.
    The counts we report are the pairs that remain, and a split left empty is refused."""
    rng = random.Random(4)
    rows = [number_pair(rng, list(range(10, 100))) for _ in range(12)]
    for row in rows[:5]:
        row["prompt"][0]["content"] += " Please think about it carefully." * 20
    pairs = write(tmp_path / "prefs.jsonl", rows)
    options = {
        "method": "dpo",
        "model": str(tiny_model_dir),
        "batch_size": 4,
        "grad_accum": 1,
        "max_length": 48,
    }
    _, _, n_train, n_eval = build_dpo_trainer(
        TrainConfig(data=str(pairs), out=str(tmp_path / "a"), **options)
    )
    assert (n_train, n_eval) == (7, 0)
    long_only = write(tmp_path / "long.jsonl", rows[:5])
    with pytest.raises(UserError, match=r"--max-length 48: every training pair's prompt fills it"):
        build_dpo_trainer(TrainConfig(data=str(long_only), out=str(tmp_path / "b"), **options))


def run_main(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_reference_models_are_one_line_exit_2(capsys, tmp_path, tiny_model_dir):
    rng = random.Random(5)
    pairs = str(write(tmp_path / "prefs.jsonl", [number_pair(rng, list(range(10, 100))) for _ in range(4)]))
    other_vocab = build_tiny_model(tmp_path / "other-vocab", vocab_size=300)
    capsys.readouterr()  # its progress bars
    dpo = ["--method", "dpo", "--data", pairs, "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    cases = [
        (
            [*dpo, "--ref-model", str(tmp_path / "nope")],
            "--ref-model " + str(tmp_path / "nope") + ": no such",
        ),
        ([*dpo, "--ref-model", str(tmp_path)], "--ref-model " + str(tmp_path) + ": neither a model"),
        ([*dpo, "--ref-model", str(other_vocab), "--lora"], "its tokenizer differs from that of --model"),
        ([*dpo[2:], "--ref-model", str(tiny_model_dir)], "--ref-model applies to --method dpo only"),
    ]
    for args, message in cases:
        assert message in run_main(capsys, *args), args


def test_qlora_without_cuda_fails_before_loading_anything(capsys, tmp_path):
    """SFT and DPO alike: the data and model named here do not even exist, so the error can only come first."""
    import torch

    missing = [
        *([] if torch.cuda.is_available() else ["a CUDA GPU"]),
        *([] if importlib.util.find_spec("bitsandbytes") else ["the bitsandbytes package"]),
    ]
    if not missing:
        pytest.skip("this machine can run QLoRA")
    for method in ("sft", "dpo"):
        err = run_main(
            capsys,
            *("--method", method, "--qlora", "--data", str(tmp_path / "none.jsonl")),
            *("--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")),
        )
        assert "--qlora needs" in err and all(m in err for m in missing), err
