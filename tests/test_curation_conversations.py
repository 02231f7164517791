"""Curation of multi-turn conversations: `dedup`, `select` and `filter` judge a record with `messages` by the
whole conversation (all user turns on the instruction side, all assistant turns on the output side), not by its
first exchange."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfinstruct.dedup import DedupConfig, dedup
from selfinstruct.filters.command import FilterCommandConfig, filter_corpus
from selfinstruct.records import CorpusRecord
from selfinstruct.select import SelectConfig, record_id, select
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.raters import RatingResponder, rating

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST = ("Tell me about the history of the Roman Empire.", "It lasted from 27 BC until 476 AD in the west.")


def conv(*exchanges: tuple[str, str], system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


A = conv(FIRST, ("What caused its fall?", "Invasions, inflation, and a divided empire all played a part."))
B = conv(  # the same first exchange as A, then another conversation altogether
    FIRST,
    (
        "Now write a poem about penguins living on the Antarctic ice and how they survive the long winter.",
        "Huddled close in the dark, they take turns at the windy edge of the crowd, and the long night passes.",
    ),
)
A_COPY = conv(
    FIRST, ("what caused ITS fall??", "Invasions, inflation, and a divided empire all played a part.")
)
SHORT_FIRST = conv(
    ("Name a Roman emperor.", "Trajan."),
    ("Tell me more about him and his wars.", " ".join(["He fought the Dacians and the Parthians."] * 6)),
    system="You are a history tutor.",
)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_text_of_covers_every_turn():
    record = CorpusRecord.from_dict(SHORT_FIRST)
    assert record.instruction == "Name a Roman emperor."  # the Alpaca fields keep the first exchange
    assert record.text_of("instruction") == "Name a Roman emperor.\n\nTell me more about him and his wars."
    assert record.text_of("output").startswith("Trajan.\n\nHe fought the Dacians")
    assert record.text_of("input") == ""
    alpaca = CorpusRecord("Sort the numbers.", "5, 3", "3, 5")
    assert [alpaca.text_of(f) for f in ("instruction", "input", "output")] == [
        "Sort the numbers.",
        "5, 3",
        "3, 5",
    ]


def test_dedup_compares_whole_conversations(tmp_path):
    corpus = write(tmp_path / "c.jsonl", [A, B, A_COPY])
    summary = dedup(DedupConfig(input=str(corpus), out=str(tmp_path / "o"), method="exact"))
    # B shares only A's first exchange: it stays; A_COPY differs from A only in case and punctuation: it goes
    assert summary["rejected_by_reason"] == {"duplicate": 1}
    assert lines(tmp_path / "o" / "kept.jsonl") == [A, B]
    (rejected,) = lines(tmp_path / "o" / "rejected.jsonl")
    assert rejected["line"] == 3 and rejected["record"] == A_COPY
    assert rejected["instruction"] == f"{FIRST[0]}\n\nwhat caused ITS fall??"
    summary = dedup(
        DedupConfig(input=str(corpus), out=str(tmp_path / "out"), method="exact", fields=["output"])
    )
    assert summary["kept"] == 2  # A_COPY's answers are A's


def test_filter_judges_all_user_turns(tmp_path):
    corpus = write(tmp_path / "c.jsonl", [A, B])
    summary = filter_corpus(FilterCommandConfig(input=str(corpus), out=str(tmp_path / "o"), stages=["rouge"]))
    assert summary["kept"] == 2 and summary["rejected_by_reason"] == {}  # first turns alone: too_similar


def test_select_scores_whole_conversations(tmp_path, tiny_model_dir):
    corpus = write(tmp_path / "c.jsonl", [A, B, SHORT_FIRST])
    records = [CorpusRecord.from_dict(r) for r in (A, B, SHORT_FIRST)]
    assert len({record_id(r) for r in records}) == 3  # A and B share the first exchange, not the id
    report = select(SelectConfig(input=str(corpus), out=str(tmp_path / "len"), n=1))
    (best,) = lines(tmp_path / "len" / "selected.jsonl")
    assert report["selected"] == 1 and best["messages"] == SHORT_FIRST["messages"]  # shortest first answer
    assert best["meta"]["select"]["scores"]["length"] == len(records[2].text_of("output").split())

    # the judge reads every turn of the conversation
    with FakeOpenAI(responder=RatingResponder()) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", backoff=0.01)
        select(
            SelectConfig(input=str(corpus), out=str(tmp_path / "j"), n=3, score=["judge"], teacher=teacher)
        )
        prompts = ["\n".join(m["content"] for m in r.json["messages"]) for r in server.completions()[1:]]
    assert len(prompts) == 3
    assert any("What caused its fall?" in p and "Invasions, inflation" in p for p in prompts)
    for r in lines(tmp_path / "j" / "selected.jsonl"):
        assert r["meta"]["select"]["scores"]["judge"] == rating(CorpusRecord.from_dict(r).text_of("output"))

    # IFD: every assistant turn in context (train's loss mask) vs all assistant turns alone
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfinstruct.evaluate import response_losses
    from selfinstruct.train import assistant_only_row

    select(
        SelectConfig(
            input=str(corpus), out=str(tmp_path / "ifd"), n=3, score=["ifd"], scorer_model=str(tiny_model_dir)
        )
    )
    line = next(x for x in lines(tmp_path / "ifd" / "scores.jsonl") if x["id"] == record_id(records[0]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    row = assistant_only_row(tok, records[0].conversation())
    with torch.no_grad():
        logprobs = model(torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)
    nll = [-logprobs[t - 1, row["input_ids"][t]].item() for t, m in enumerate(row["completion_mask"]) if m]
    assert sum(row["completion_mask"]) > len(tok(A["messages"][1]["content"])["input_ids"])  # both answers
    assert line["ppl_conditioned"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    (direct,) = response_losses(
        str(tiny_model_dir), [{"prompt": "", "completion": records[0].text_of("output")}], batch_size=1
    )
    assert line["ppl_direct"] == pytest.approx(math.exp(direct.nll / direct.tokens), rel=1e-4)
