"""The one corpus reader: every input kind gives the same records, and every malformed chat line is one
`file:line: ...` error."""

from __future__ import annotations

import json

import pytest

from selfinstruct.corpus import load_corpus_any, load_corpus_rows
from selfinstruct.errors import InputFileError
from selfinstruct.export import ExportConfig, run_export

TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_all_chat_shapes_and_alpaca_lines_mix_in_one_file(tmp_path):
    share = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in TURNS
    ]
    path = write(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"messages": TURNS, "source": "tulu-mix", "id": "x1"},
            {"conversations": share},
            {"prompt": TURNS[:4], "completion": TURNS[4:]},
        ],
    )
    alpaca, tulu, sharegpt, prompt_completion = load_corpus_any(path)
    assert alpaca.messages is None and alpaca.turns == 1 and alpaca.output == "5"
    for r in (tulu, sharegpt, prompt_completion):
        assert r.messages == TURNS and r.turns == 2 and (r.instruction, r.output) == ("Hi", "Hello")
    assert tulu.meta == {"source": "tulu-mix", "id": "x1"} and sharegpt.meta == {}
    rows = load_corpus_rows(path)
    assert [line for line, _, _ in rows] == [1, 2, 3, 4] and rows[2][1] == {"conversations": share}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
        ({"messages": TURNS[1:2] + TURNS[1:3]}, "message 2: expected an assistant turn, got user"),
        ({"messages": TURNS[2:]}, "message 1: expected a user turn, got assistant"),
        ({"messages": [*TURNS[1:3], TURNS[0]]}, "message 3: expected a user turn, got system"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "message 1: role must be system, user or assistant",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "message 1 (user) needs a string content"),
        ({"conversations": "hello"}, "field 'conversations' must be a list of {from, value} objects"),
        ({"prompt": "hi", "completion": []}, "fields 'prompt' and 'completion' must both be lists"),
        ({"messages": {"role": "user"}}, "field 'messages' must be a list"),
    ],
)
def test_bad_chat_lines_are_one_file_line_error(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, row])
    with pytest.raises(InputFileError, match=r"bad\.jsonl:2: ") as e:
        load_corpus_any(path)
    assert message in str(e.value)


def test_parquet_and_run_directories_read_like_their_jsonl(tmp_path):
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "meta": {"task_id": "t1"}}]
    run = tmp_path / "run"
    run.mkdir()
    write(run / "corpus.jsonl", rows)
    parquet = tmp_path / "c.parquet"
    assert (
        run_export(
            ExportConfig(source=str(run), format="parquet", out=str(parquet), keep_meta=True, card=False)
        )
        == 0
    )
    from_run, from_file, from_parquet = (load_corpus_any(p) for p in (run, run / "corpus.jsonl", parquet))
    assert from_run == from_file == from_parquet and from_parquet[0].meta == {"task_id": "t1"}
    with pytest.raises(InputFileError, match=r"no corpus\.jsonl in this run directory"):
        load_corpus_any(tmp_path)
