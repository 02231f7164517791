"""`split` and `evaluate` on conversations: whole conversations held out with their `messages`, every assistant
turn scored with the gold history, per-turn rows, and a turn's log-loss against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfinstruct.errors import UserError
from selfinstruct.evaluate import EvaluateConfig, evaluate, rouge_l, turn_examples, turn_losses
from selfinstruct.records import CorpusRecord
from selfinstruct.split import SplitConfig, split

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def _conversation(n: int, turns: int, category: str) -> dict:
    messages = [SYSTEM] if n % 2 else []
    for k in range(1, turns + 1):
        messages += [
            {"role": "user", "content": f"Question {k} of conversation {n} about {category}?"},
            {"role": "assistant", "content": f"Answer {k} to conversation {n}: it is {category} fact {k}."},
        ]
    return {"messages": messages, "meta": {"task_id": f"conv_{n}", "category": category}}


CORPUS = [_conversation(n, 2 + n % 2, ("food", "math", "travel")[n % 3]) for n in range(9)] + [
    {
        "instruction": "Name a colour.",
        "input": "",
        "output": "Blue.",
        "meta": {"task_id": "a0", "category": "food"},
    }
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_holds_out_whole_conversations_with_their_messages(tmp_path: Path):
    corpus = _write(tmp_path / "chat.jsonl", CORPUS)
    result = split(SplitConfig(corpus=str(corpus), out=str(tmp_path / "s"), holdout_categories=["math"]))
    held = [json.loads(line) for line in (tmp_path / "s" / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "s" / "train.jsonl").read_text().splitlines()]
    assert len(held) + len(train) == len(CORPUS) and result.heldout_tasks == len(held) >= 3
    by_id = {r["meta"]["task_id"]: r for r in CORPUS}
    for row in held + train:  # written back whole: every turn, roles, system turn and meta
        assert row == by_id[row["meta"]["task_id"]]
    assert {r["meta"]["category"] for r in held} >= {"math"}
    assert "math" not in {r["meta"]["category"] for r in train}
    assert not {r["meta"]["task_id"] for r in held} & {r["meta"]["task_id"] for r in train}


def test_turn_prompts_carry_the_gold_history_and_alpaca_is_refused():
    records = [CorpusRecord.from_dict(r) for r in CORPUS]
    examples = turn_examples(records, "chat", "data.jsonl")
    assert len(examples) == sum(r.turns for r in records)
    conv = records[1].conversation()  # system + 3 exchanges
    second = next(e for e in examples if e["record"] == 1 and e["turn"] == 2)
    assert second["prompt"] == conv[:4] and second["completion"] == [conv[4]]
    assert [e["turn"] for e in examples if e["record"] == 9] == [1]  # the Alpaca record: one turn
    with pytest.raises(UserError, match="9 records are conversations with several turns") as e:
        turn_examples(records, "alpaca", "data.jsonl")
    assert "\n" not in str(e.value)


def _hand_turn_loss(model_dir: Path, messages: list[dict], turn: int) -> tuple[float, int]:
    """Mean NLL of assistant turn `turn`'s tokens (its answer through `<|im_end|>\\n`, found as characters in
    the rendered conversation) given everything before it, from transformers' own loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tok.apply_chat_template(messages, tokenize=False)
    head, begin = "<|im_start|>assistant\n", 0
    for _ in range(turn):
        begin = text.index(head, begin) + len(head)
    end = text.index("<|im_end|>", begin) + len("<|im_end|>\n")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if begin <= lo and hi <= end else -100
        for t, (lo, hi) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return float(loss), sum(label != -100 for label in labels)


def test_turn_loss_equals_a_hand_computation(tiny_model_dir: Path):
    records = [CorpusRecord.from_dict(r) for r in CORPUS[:3]]
    losses = turn_losses(str(tiny_model_dir), records, "chat", batch_size=2)  # padded batch
    assert len(losses) == 2 + 3 + 2
    expected, tokens = _hand_turn_loss(tiny_model_dir, CORPUS[1]["messages"], 2)
    second = losses[2 + 1]  # record 1, turn 2
    assert second.tokens == tokens > 0
    assert second.nll / second.tokens == pytest.approx(expected, rel=1e-5)


@pytest.mark.vllm
def test_split_then_evaluate_a_chat_corpus(tiny_model_dir: Path, vllm_teacher, tmp_path: Path):
    corpus = _write(tmp_path / "chat.jsonl", CORPUS)
    split(SplitConfig(corpus=str(corpus), out=str(tmp_path / "s"), holdout_categories=["math"], seed=3))
    heldout = tmp_path / "s" / "heldout.jsonl"
    held = [json.loads(line) for line in heldout.read_text().splitlines()]
    cfg = EvaluateConfig(
        model=str(tiny_model_dir),
        data=str(heldout),
        train_data=str(tmp_path / "s" / "train.jsonl"),
        out=str(tmp_path / "eval"),
        max_tokens=8,
    )
    result = evaluate(cfg, teachers={"tuned": vllm_teacher})
    n_turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in held)
    assert result["records"] == len(held) and result["overall"]["all"]["examples"] == n_turns
    assert result["overall"]["unseen"]["examples"] >= 5  # the math conversations
    turns = result["turns"]
    assert list(turns) == ["1", "2", "3"]
    assert turns["1"]["examples"] == turns["2"]["examples"] == len(held)
    assert turns["3"]["examples"] == sum(len(r["messages"]) >= 6 for r in held)
    assert (
        sum(t["tuned"]["response_tokens"] for t in turns.values())
        == result["overall"]["all"]["tuned"]["response_tokens"]
    )

    predictions = [
        json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == n_turns
    assert sorted((p["conversation"], p["turn"]) for p in predictions) == sorted(
        (i, k)
        for i, r in enumerate(held)
        for k in range(1, 1 + sum(m["role"] == "assistant" for m in r["messages"]))
    )
    for p in predictions:
        messages = held[p["conversation"]]["messages"]
        answers = [m for m in messages if m["role"] == "assistant"]
        questions = [m for m in messages if m["role"] == "user"]
        assert p["reference"] == answers[p["turn"] - 1]["content"]
        assert p["instruction"] == questions[p["turn"] - 1]["content"]
        assert p["tuned"]["rouge_l"] == rouge_l(p["tuned"]["prediction"], p["reference"])
    p = next(p for p in predictions if p["turn"] == 2)
    expected, _ = _hand_turn_loss(tiny_model_dir, held[p["conversation"]]["messages"], 2)
    assert p["tuned"]["log_loss"] == pytest.approx(expected, rel=1e-5)

    table = (tmp_path / "eval" / "eval.md").read_text()
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("| ")]
    assert names[:6] == ["all", "seen", "unseen", "turn 1", "turn 2", "turn 3"]
