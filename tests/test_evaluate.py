"""`selfinstruct split` and `selfinstruct evaluate`: metrics on hand-made cases, the held-out split, the
response log-loss against a direct computation, and evaluate end to end on the tiny model with real vLLM."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfinstruct.corpus import load_alpaca
from selfinstruct.errors import UserError
from selfinstruct.evaluate import (
    EvaluateConfig,
    evaluate,
    exact_match,
    examples_for,
    normalize_answer,
    response_losses,
    rouge_l,
    task_of,
    tokenize_example,
)
from selfinstruct.models import resolve_model
from selfinstruct.records import CorpusRecord
from selfinstruct.split import SplitConfig, split, split_records

# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("prediction", "reference", "stem", "expected"),
    [
        ("The cat sat on the mat.", "the cat sat on the mat", False, 1.0),
        ("dogs bark", "cats meow", False, 0.0),
        ("", "anything at all", False, 0.0),
        ("!!!", "", False, 0.0),
        ("the cat sat", "the cat sat on the mat", False, 2 * 1.0 * 0.5 / 1.5),  # p = 1, r = 1/2
        ("a b c d", "a x c y", False, 0.5),  # LCS "a c"
        ("running dogs", "run dog", False, 0.0),
        ("running dogs", "run dog", True, 1.0),  # Porter stemming, as SuperNI scores
    ],
)
def test_rouge_l_known_values(prediction: str, reference: str, stem: bool, expected: float):
    assert rouge_l(prediction, reference, use_stemmer=stem) == expected


WORDS = st.sampled_from("the a cat cats sat sitting on mat dog dogs ran running café 42 x-ray, !".split())


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=12), st.lists(WORDS, max_size=12), st.booleans())
def test_rouge_l_equals_rouge_score(prediction: list[str], reference: list[str], stem: bool):
    from rouge_score import rouge_scorer

    pred, ref = " ".join(prediction), " ".join(reference)
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref, use_stemmer=stem) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "same"),
    [
        ("Positive.", "positive", True),
        ("  The answer:   B ", "answer b", True),
        ("An apple", "apple!", True),
        ("not positive", "positive", False),
        ("Yes", "No", False),
        ("theory", "ory", False),  # articles only as whole words
    ],
)
def test_exact_match_normalisation(prediction: str, reference: str, same: bool):
    assert exact_match(prediction, reference) is same
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"


# ---------------------------------------------------------------- split


def _corpus(n_tasks: int = 40) -> list[CorpusRecord]:
    cats = ["writing", "math", "classification", "qa", "code"]
    records = []
    for t in range(n_tasks):
        for k in range(1 + t % 3):
            meta = {"task_id": f"t{t}", "category": cats[t % len(cats)]}
            records.append(CorpusRecord(f"Instruction of task {t}", f"input {k}", f"output {t}.{k}", meta))
    return records


def test_split_holds_out_whole_categories_and_whole_tasks():
    records = _corpus()
    r = split_records(records, ["math", "code"], 0.25, seed=0)
    assert len(r.train) + len(r.heldout) == len(records)
    train_tasks, held_tasks = {task_of(x) for x in r.train}, {task_of(x) for x in r.heldout}
    assert not train_tasks & held_tasks  # no task straddles
    assert {x.meta["category"] for x in r.train} == {"writing", "classification", "qa"}
    assert {"math", "code"} <= {x.meta["category"] for x in r.heldout}
    assert r.train_tasks == 18 and r.heldout_tasks == 16 + 6  # 24 other tasks, a quarter of them held out
    assert r.unseen_categories == ["code", "math"]


def test_split_is_deterministic_and_seeded():
    records = _corpus()
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    a, b = split_records(records, ["qa"], 0.3, seed=1), split_records(shuffled, ["qa"], 0.3, seed=1)
    assert {task_of(x) for x in a.heldout} == {task_of(x) for x in b.heldout}
    other = split_records(records, ["qa"], 0.3, seed=2)
    assert {task_of(x) for x in a.heldout} != {task_of(x) for x in other.heldout}


def test_split_groups_records_without_task_id_by_instruction():
    records = [CorpusRecord(f"task {t}", f"in {k}", "out") for t in range(10) for k in range(3)]
    r = split_records(records, [], 0.5, seed=0)
    assert len(r.heldout) == 15 and not {x.instruction for x in r.train} & {x.instruction for x in r.heldout}


def test_split_command_writes_files_and_refuses_to_overwrite(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in _corpus()))
    cfg = SplitConfig(corpus=str(corpus), out=str(tmp_path / "s"), holdout_categories=["math"])
    result = split(cfg)
    assert [r.to_dict() for r in load_alpaca(tmp_path / "s" / "heldout.jsonl")] == [
        r.to_dict() for r in result.heldout
    ]
    assert len(load_alpaca(tmp_path / "s" / "train.jsonl")) == len(result.train)
    assert json.loads((tmp_path / "s" / "split.json").read_text())["unseen_categories"] == ["math"]
    with pytest.raises(UserError, match="exists"):
        split(cfg)
    split(cfg.model_copy(update={"force": True}))
    with pytest.raises(UserError, match="nope"):
        split(cfg.model_copy(update={"force": True, "holdout_categories": ["nope"]}))


# ---------------------------------------------------------------- response log-loss

HELDOUT = [
    ("Write a poem about the sea.", "", "Waves crash on the rocks all night.", "writing", False),
    ("Classify the sentiment of the review.", "I love this phone.", "Positive", "classification", True),
    ("Classify the sentiment of the review.", "Terrible battery.", "Negative", "classification", True),
    ("Answer the question.", "What is two plus two?", "Four.", "qa", False),
    ("Translate the sentence to French.", "Good morning.", "Bonjour.", "translation", False),
]


def _heldout() -> list[CorpusRecord]:
    return [
        CorpusRecord(
            i, x, o, {"task_id": f"h{n}" if n < 1 or n > 2 else "h1", "category": c, "is_classification": k}
        )
        for n, (i, x, o, c, k) in enumerate(HELDOUT)
    ]


def _direct_mean_nll(model_dir: Path, example: dict) -> tuple[float, int]:
    """Mean NLL over the response tokens, straight from transformers' own loss with -100 on the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, start = tokenize_example(tok, example)
    labels = [-100] * start + ids[start:]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return float(loss), len(ids) - start


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_response_loss_matches_direct_computation(tiny_model_dir: Path, template: str):
    from transformers import AutoTokenizer

    examples = examples_for(_heldout(), template)
    batched = response_losses(str(tiny_model_dir), examples, batch_size=4)  # padded batches
    for loss, example in zip(batched, examples, strict=True):
        expected, tokens = _direct_mean_nll(tiny_model_dir, example)
        assert loss.tokens == tokens > 0
        assert loss.nll / loss.tokens == pytest.approx(expected, rel=1e-5)
    # --max-length cuts prompt + response: only the response tokens that fit are scored.
    _, start = tokenize_example(AutoTokenizer.from_pretrained(tiny_model_dir), examples[0])
    (cut,) = response_losses(str(tiny_model_dir), examples[:1], max_length=start + 2)
    assert cut.tokens == 2


def test_prompts_and_loss_mask_match_training(tiny_model_dir: Path, tmp_path: Path):
    """The tokens evaluate scores are exactly those `selfinstruct train` puts a loss on."""
    from transformers import AutoTokenizer

    from selfinstruct.train import TrainConfig, build_trainer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in _heldout()))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for template in ("chat", "alpaca"):
        cfg = TrainConfig(
            data=str(corpus), model=str(tiny_model_dir), out=str(tmp_path / template), template=template
        )
        trainer = build_trainer(cfg)[0]
        for row, example in zip(trainer.train_dataset, examples_for(_heldout(), template), strict=True):
            ids, start = tokenize_example(tok, example)
            assert ids == row["input_ids"]
            assert row["labels"] == [-100] * start + ids[start:]


def test_lora_adapter_is_merged_for_evaluation(tiny_model_dir: Path, tmp_path: Path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfinstruct.evaluate import _default_base

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    assert _default_base(str(adapter)) == str(tiny_model_dir)

    merged = resolve_model(str(adapter), "--model")
    assert (Path(merged) / "config.json").is_file()
    example = examples_for(_heldout()[:1], "chat")[0]
    (loss,) = response_losses(merged, [example])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter
    )
    tok = AutoTokenizer.from_pretrained(adapter)
    ids, start = tokenize_example(tok, example)
    with torch.no_grad():
        expected = peft_model(
            input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] * start + ids[start:]])
        ).loss
    assert loss.nll / loss.tokens == pytest.approx(float(expected), rel=1e-4)
    base_loss = response_losses(str(tiny_model_dir), [example])[0]
    assert base_loss.nll != pytest.approx(loss.nll, rel=1e-3)  # the adapter does change the model


def test_bad_model_paths_are_one_line_errors(tmp_path: Path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"), "--model")
    with pytest.raises(UserError, match="neither a model"):
        resolve_model(str(tmp_path), "--base")


# ---------------------------------------------------------------- end to end


def _write(path: Path, records: list[CorpusRecord]) -> Path:
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


@pytest.mark.vllm
def test_evaluate_end_to_end_with_vllm(tiny_model_dir: Path, vllm_teacher, tmp_path: Path):
    heldout = _write(tmp_path / "heldout.jsonl", _heldout())
    train = _write(
        tmp_path / "train.jsonl",
        [
            CorpusRecord("Write a limerick.", "", "There once was...", {"category": c})
            for c in ("writing", "qa")
        ],
    )
    cfg = EvaluateConfig(
        model=str(tiny_model_dir),
        base=str(tiny_model_dir),
        data=str(heldout),
        train_data=str(train),
        out=str(tmp_path / "eval"),
        max_tokens=12,
    )
    result = evaluate(cfg, teachers={"tuned": vllm_teacher, "base": vllm_teacher})
    out = tmp_path / "eval"
    assert json.loads((out / "eval.json").read_text()) == {k: v for k, v in result.items() if k != "out"}
    assert result["template"] == "chat"
    overall = result["overall"]
    assert {name: s["examples"] for name, s in overall.items()} == {"all": 5, "seen": 2, "unseen": 3}
    unseen = {c: s["unseen"] for c, s in result["categories"].items()}
    assert unseen == {"classification": True, "qa": False, "translation": True, "writing": False}
    assert overall["all"]["tuned"] == overall["all"]["base"]  # the same model, answered once
    assert result["categories"]["classification"]["tuned"]["classification_examples"] == 2
    assert result["categories"]["writing"]["tuned"]["exact_match"] is None

    # Log-loss: token-weighted mean over all held-out responses, as computed directly with transformers.
    direct = [_direct_mean_nll(tiny_model_dir, e) for e in examples_for(_heldout(), "chat")]
    expected = sum(m * n for m, n in direct) / sum(n for _, n in direct)
    assert overall["all"]["tuned"]["log_loss"] == pytest.approx(expected, rel=1e-5)
    assert overall["all"]["tuned"]["response_tokens"] == sum(n for _, n in direct)

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 5
    for p in predictions:
        assert p["tuned"]["rouge_l"] == rouge_l(p["tuned"]["prediction"], p["reference"])
    mean_rouge = sum(p["tuned"]["rouge_l"] for p in predictions) / 5
    assert overall["all"]["tuned"]["rouge_l"] == pytest.approx(mean_rouge)

    table = (out / "eval.md").read_text().splitlines()
    assert table[0].startswith("| slice | n | ROUGE-L base | ROUGE-L tuned | EM base | EM tuned | loss base")
    names = [line.split("|")[1].strip() for line in table[2:] if line.startswith("| ")]
    assert names == [
        "all",
        "seen",
        "unseen",
        "classification (unseen)",
        "qa",
        "translation (unseen)",
        "writing",
    ]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfinstruct.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.vllm
def test_evaluate_cli_against_a_vllm_server(tiny_model_dir: Path, vllm_server, tmp_path: Path):
    heldout = _write(tmp_path / "heldout.jsonl", _heldout())
    done = _cli(
        "evaluate", "--model", str(tiny_model_dir), "--data", str(heldout), "--out", str(tmp_path / "e"),
        "--teacher", "openai", "--base-url", vllm_server.url, "--served-model", vllm_server.model,
        "--max-tokens", "8", "--no-loss",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "| all | 5 |" in done.stdout
        and "ROUGE-L tuned" in done.stdout
        and "base" not in done.stdout.split("\n")[0]
    )
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["models"] == {"tuned": str(tiny_model_dir)}
    assert result["overall"]["all"]["tuned"]["log_loss"] is None
    assert len((tmp_path / "e" / "predictions.jsonl").read_text().splitlines()) == 5


def test_cli_bad_inputs_exit_2(tiny_model_dir: Path, tmp_path: Path):
    heldout = _write(tmp_path / "heldout.jsonl", _heldout())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["evaluate", "--data", str(heldout)], "needs --model"),
        (["evaluate", "--model", str(tiny_model_dir)], "needs --data"),
        (["evaluate", "--model", str(tiny_model_dir), "--data", str(empty)], "file is empty"),
        (["evaluate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl")], "not found"),
        (
            ["evaluate", "--model", str(tmp_path / "nope"), "--data", str(heldout), "--out", "x"],
            "no such directory",
        ),
        (["evaluate", "--model", str(tmp_path), "--data", str(heldout)], "neither a model"),
        (
            ["split", str(heldout), "--out", str(tmp_path / "s"), "--holdout-categories", "x"],
            "x not in the corpus",
        ),
        (
            ["split", str(heldout), "--out", str(tmp_path / "s"), "--holdout-fraction", "1.5"],
            "holdout_fraction",
        ),
        (["split", str(empty), "--out", str(tmp_path / "s")], "file is empty"),
    ]
    for args, message in cases:
        done = _cli(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
