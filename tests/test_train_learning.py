"""A learning test that can fail: a tiny model trained from scratch through `selfinstruct train` must solve
held-out instances of procedurally generated string tasks far more often than before training."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from selfinstruct.records import CorpusRecord
from selfinstruct.tinymodel import build_tiny_model
from selfinstruct.train import TrainConfig, train

WORDS = "red blue green black white pink gray gold cyan navy".split()
NUMBERS = "zero one two three four five six seven eight nine".split()

TASKS = {  # comma-separated lists: every word is the same token wherever it appears
    "Reverse the list.": lambda ws: ",".join(reversed(ws)),
    "Write the list in upper case.": lambda ws: ",".join(w.upper() for w in ws),
    "How many items are in the list?": lambda ws: NUMBERS[len(ws)],
    "What is the first item?": lambda ws: ws[0],
    "What is the last item?": lambda ws: ws[-1],
}


def make_records(n_train: int, n_test: int, seed: int = 0) -> tuple[list[CorpusRecord], list[CorpusRecord]]:
    """`n_test` instances per task on word sequences held out from training, and `n_train` training instances."""
    rng = random.Random(seed)
    sequences = [list(ws) for n in (2, 3) for ws in itertools.permutations(WORDS, n)]
    rng.shuffle(sequences)
    held_out, pool = sequences[: n_test * len(TASKS)], sequences[n_test * len(TASKS) :]
    tasks = list(TASKS.items())
    test = [
        CorpusRecord(task, ",".join(ws), fn(ws))
        for i, ws in enumerate(held_out)
        for task, fn in [tasks[i % len(tasks)]]
    ]
    train_records = []
    for _ in range(n_train):
        task, fn = rng.choice(tasks)
        ws = rng.choice(pool)
        train_records.append(CorpusRecord(task, ",".join(ws), fn(ws)))
    return train_records, test


def accuracy(model_dir: Path, records: list[CorpusRecord]) -> float:
    """Greedy exact match, prompting with the same chat format training used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r.user_message()}], add_generation_prompt=True, tokenize=False
        )
        for r in records
    ]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(a.strip() == r.output for a, r in zip(answers, records, strict=True)) / len(records)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_from_scratch_solves_held_out_string_tasks(tmp_path):
    train_records, test_records = make_records(n_train=3000, n_test=10)
    # The tokenizer learns the chat roles and every list word as one token; 8 narrow heads learn the copy
    # patterns far more reliably than 2 wide ones.
    texts = [f"user\nassistant\n{r.instruction}\n\n{r.input}\n{r.output}" for r in train_records]
    model_dir = build_tiny_model(
        tmp_path / "scratch",
        texts=texts,
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=256,
    )
    corpus = tmp_path / "tasks.jsonl"
    corpus.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in train_records))

    before = accuracy(model_dir, test_records)
    cfg = TrainConfig(
        data=str(corpus),
        model=str(model_dir),
        out=str(tmp_path / "out"),
        packing=True,
        max_length=512,
        batch_size=2,
        grad_accum=1,
        max_steps=600,
        learning_rate=2e-3,  # 3e-3 and above stall on some seeds
        warmup_ratio=0.05,
        save_steps=10_000,
        logging_steps=100,
        seed=0,
    )
    result = train(cfg)
    after = accuracy(Path(result.out), test_records)
    print(f"held-out exact match: before {before:.0%}, after {after:.0%}")
    assert before <= 0.05
    assert after >= 0.6  # 0.96-1.0 measured over five seeds
