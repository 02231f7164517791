"""`train` on conversations: the loss covers exactly the assistant turns (checked token by token against the
rendered text's character spans), and `--max-length` splits long conversations between exchanges."""

from __future__ import annotations

import json
import math
from pathlib import Path

from selfinstruct.train import TrainConfig, build_trainer, split_conversation

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
THREE_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Name a red fruit."},
    {"role": "assistant", "content": "A strawberry is red."},
    {"role": "user", "content": "And a yellow one?"},
    {"role": "assistant", "content": "A banana is yellow."},
    {"role": "user", "content": "Which of the two is sweeter?"},
    {"role": "assistant", "content": "Ripe bananas are usually sweeter."},
]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(data: Path, model: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(data=str(data), model=str(model), out=str(out), batch_size=2, grad_accum=1, max_steps=2)
    return TrainConfig(**{**settings, **kw})


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn's answer and its end of turn (`<|im_end|>` and the newline after
    it), found in the rendered text: what the loss should cover."""
    spans, start = [], 0
    head = "<|im_start|>assistant\n"
    while (i := text.find(head, start)) >= 0:
        begin = i + len(head)
        end = text.index("<|im_end|>", begin) + len("<|im_end|>\n")
        spans.append((begin, end))
        start = end
    return spans


def test_loss_mask_covers_exactly_the_assistant_turns_of_a_three_turn_sample(tiny_model_dir, tmp_path):
    data = write(tmp_path / "chat.jsonl", [{"messages": THREE_TURNS}, {"messages": THREE_TURNS[:3]}])
    trainer, cfg, n_train, _ = build_trainer(config(data, tiny_model_dir, tmp_path / "out", template="chat"))
    assert cfg.template == "chat" and n_train == 2
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    text = tok.apply_chat_template(THREE_TURNS, tokenize=False)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == encoded["input_ids"]
    spans = assistant_spans(text)
    assert len(spans) == 3
    expected = [
        token if any(a <= lo and hi <= b for a, b in spans) else -100
        for token, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    labels = batch["labels"][0].tolist()
    assert labels[: len(expected)] == expected  # token by token
    assert all(x == -100 for x in labels[len(expected) :])  # padding
    trained = tok.decode([t for t in labels if t != -100])
    for m in THREE_TURNS:
        assert (m["content"] in trained) == (m["role"] == "assistant"), m
    assert trained.count("<|im_end|>") == 3  # every turn's end is learned: the model stops after each answer
    # the same mask transformers derives from the template's {% generation %} tags, plus the newline after each end
    hf = tok.apply_chat_template(THREE_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    ours = [int(x != -100) for x in expected]
    assert all(o >= h for o, h in zip(ours, hf["assistant_masks"], strict=True))
    assert sum(ours) - sum(hf["assistant_masks"]) == 3
    result = trainer.train()
    assert math.isfinite(result.training_loss)


def test_max_length_splits_long_conversations_between_exchanges(tiny_model_dir, tmp_path):
    long_answers = [
        SYSTEM,
        *[
            m
            for k in range(6)
            for m in (
                {"role": "user", "content": f"Tell me fact number {k} about rivers."},
                {"role": "assistant", "content": f"Fact {k}: " + "rivers carry water to the sea. " * 6},
            )
        ],
    ]
    data = write(tmp_path / "long.jsonl", [{"messages": long_answers}, {"messages": THREE_TURNS}])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    whole = len(tok(tok.apply_chat_template(long_answers, tokenize=False))["input_ids"])
    pair = len(tok(tok.apply_chat_template([SYSTEM, *long_answers[1:3]], tokenize=False))["input_ids"])
    max_length = 2 * pair + 20  # room for about two exchanges and the system turn
    pieces = split_conversation(tok, long_answers, max_length)
    assert len(pieces) >= 3 and whole > max_length
    for piece in pieces:
        assert piece[0] == SYSTEM and piece[1]["role"] == "user" and piece[-1]["role"] == "assistant"
        assert len(tok(tok.apply_chat_template(piece, tokenize=False))["input_ids"]) <= max_length
    answers = [m for p in pieces for m in p[1:] if m["role"] == "assistant"]
    assert answers == [m for m in long_answers if m["role"] == "assistant"]  # each answer once, in order
    trainer, _, n_train, _ = build_trainer(
        config(data, tiny_model_dir, tmp_path / "out", template="chat", max_length=max_length)
    )
    assert n_train == len(pieces) + 1
    for k in range(len(pieces)):  # no answer was cut off: every piece ends with a learned end of turn
        ids = trainer.train_dataset[k]["input_ids"]
        assert len(ids) <= max_length and tok.decode(ids).endswith("<|im_end|>\n")
