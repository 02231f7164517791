"""`selfinstruct converse` against the fake OpenAI-compatible server: conversation shape and turn bounds,
rejection reasons, resume after kill -9, a separate user-simulator teacher, base-model prompts; export → import
round-trips of the three chat formats; every command reading conversations; `stats` on them."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from selfinstruct.converse import ConverseConfig, clean_turn, parse_turns, run_converse, turn_problem
from selfinstruct.corpus import load_corpus_any, load_corpus_rows, load_tasks_any
from selfinstruct.errors import UserError
from selfinstruct.export import ExportConfig, run_export
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import SMALL_SEEDS, ConverseResponder, SignalOnFirstRequest

QUIET = Console(stderr=True, quiet=True)

TRIGGERED = {
    "leak": "Plan a three-day hiking trip through the Scottish highlands for beginners [leak]",
    "refuse": "Write a limerick about a forgetful robot that loses its keys [refuse]",
    "empty": "Estimate how many litres of water a household of four uses per week [empty]",
    "repeat": "Translate a polite complaint about late train departures into German [repeat]",
    "flaky": "Recommend three board games for a family with young children on holiday [flaky]",
    "label": "Compose a haiku about autumn leaves falling on a quiet city street [label]",
    "mute": "Give reasons why octopuses are considered intelligent sea creatures [mute]",
}


def corpus(path: Path, plain: int = 8, triggered: bool = True) -> Path:
    records = [
        {"instruction": i, "input": x, "output": o, "meta": {"category": "labels" if clf else "open"}}
        for i, x, o, clf in SMALL_SEEDS[:plain]
    ]
    if triggered:
        records += [{"instruction": text, "input": "", "output": "Sure."} for text in TRIGGERED.values()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(
    inp: Path, out: Path, server: FakeOpenAI, teacher: dict | None = None, **settings
) -> ConverseConfig:
    t = {"model": "fake-model", "base_url": [server.url], "api_key_env": "", "concurrency": 1}
    t.update({"max_retries": 1, "backoff": 0.01, "timeout": 5.0, **(teacher or {})})
    return ConverseConfig(input=str(inp), out=str(out), teacher=TeacherConfig(**t), **settings)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_shape(messages: list[dict], lo: int, hi: int) -> None:
    """Optional system turn, then user/assistant alternating, ending with the assistant, lo..hi exchanges."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert len(turns) % 2 == 0 and turns[-1]["role"] == "assistant"
    assert lo <= len(turns) // 2 <= hi
    assert all(m["content"].strip() for m in messages)


@pytest.fixture(scope="module")
def conversed(tmp_path_factory) -> tuple[Path, Path]:
    """8 plain and 7 triggered records grown into 2-4 turn conversations, one request in flight."""
    tmp = tmp_path_factory.mktemp("converse")
    inp = corpus(tmp / "in.jsonl")
    with FakeOpenAI(responder=ConverseResponder(seed=1)) as server:
        assert run_converse(config(inp, tmp / "run", server, turns="2-4", seed=3), console=QUIET) == 0
    return inp, tmp / "run"


def test_roles_alternate_end_with_the_assistant_and_turn_bounds_hold(conversed):
    inp, run = conversed
    records = lines(run / "corpus.jsonl")
    inputs = load_corpus_any(inp)
    assert len(records) == 8 + 2  # the plain ones, flaky and label (the other triggers end too early)
    for rec in records:
        check_shape(rec["messages"], 2, 4)
        meta = rec["meta"]
        parent = inputs[int(meta["parent_id"].removeprefix("record_"))]
        assert meta["source"] == "converse" and meta["task_id"].startswith("conv_")
        assert meta.get("category") == parent.meta.get("category")  # split can hold a category out
        assert rec["messages"][0] == {"role": "user", "content": parent.user_message()}
        assert rec["messages"][1] == {"role": "assistant", "content": parent.output}  # reused output
        assert meta["turns"] == len(rec["messages"]) // 2 and 2 <= meta["target_turns"] <= 4
        if "ended_by" not in meta:
            assert meta["turns"] == meta["target_turns"]
    targets = Counter(r["meta"]["target_turns"] for r in records)
    assert len(targets) >= 2  # lengths are drawn, not fixed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["kept"] == len(records) == summary["corpus_records"]
    assert sum(summary["turns_histogram"].values()) == len(records)


def test_split_holds_out_the_conversations_of_a_category(conversed, tmp_path):
    from selfinstruct.split import SplitConfig, split

    _, run = conversed
    split(SplitConfig(corpus=str(run), out=str(tmp_path), holdout_categories=["open"], holdout_fraction=0))
    heldout, train = lines(tmp_path / "heldout.jsonl"), lines(tmp_path / "train.jsonl")
    assert heldout and all(r["meta"]["category"] == "open" and len(r["messages"]) >= 4 for r in heldout)
    assert train and all("category" not in r["meta"] for r in train)  # the triggered records have none
    assert len(heldout) + len(train) == len(lines(run / "corpus.jsonl"))


def test_rejected_turns_are_logged_with_their_reason_and_retried(conversed):
    _, run = conversed
    rejected = lines(run / "rejected.jsonl")
    by_conv: dict[str, list[str]] = {}
    for r in rejected:
        by_conv.setdefault(r["meta"]["id"], []).append(r["reason"])
    order = {name: f"conv_{8 + k:06d}" for k, name in enumerate(TRIGGERED)}
    # three attempts (1 + --retries 2) each, then the conversation has 1 exchange: dropped as too short
    for name, reason in [("leak", "role_leak"), ("refuse", "refusal"), ("empty", "empty_turn")]:
        assert by_conv[order[name]] == [reason] * 3 + ["too_few_turns"], name
    assert by_conv[order["repeat"]] == ["repeated_turn"] * 3 + ["too_few_turns"]
    assert by_conv[order["flaky"]] == ["role_leak"]  # retried, then fine
    assert order["label"] not in by_conv  # "User: …" is cleaned, not rejected
    # [mute]: answers after the first are empty: the conversation ends at 1 exchange
    assert by_conv[order["mute"]] == ["empty_turn"] * 3 + ["too_few_turns"]
    kept = {r["meta"]["task_id"]: r for r in lines(run / "corpus.jsonl")}
    assert order["flaky"] in kept and order["label"] in kept
    assert all(not m["content"].startswith("User:") for m in kept[order["label"]]["messages"])
    repeated = [r for r in rejected if r["reason"] == "repeated_turn"]
    assert all(r["nearest"]["score"] == 1.0 for r in repeated if r["meta"]["id"] == order["repeat"])
    assert any(0.7 < r["nearest"]["score"] < 1.0 for r in repeated)  # ROUGE-L near-copies of an earlier turn
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
    assert summary["dropped"] == 5


def test_turn_checks_and_bounds():
    assert parse_turns("3") == (3, 3) and parse_turns("2-5") == (2, 5)
    for bad in ("1", "4-2", "two", "1-3"):
        with pytest.raises(ValueError):
            parse_turns(bad)
    assert clean_turn('User: "How long does it take?"', "user") == "How long does it take?"
    assert clean_turn("Assistant: It takes a day.", "assistant") == "It takes a day."
    assert turn_problem("Fine.\nUser: and then?", "assistant", False) == "role_leak"
    assert turn_problem("**Assistant:** ok", "user", False) == "role_leak"
    assert turn_problem("As an AI, I cannot ask questions.", "user", False) == "refusal"
    assert turn_problem("I'm sorry for your loss; here is what to do.", "assistant", False) is None
    assert turn_problem("", "user", False) == "empty_turn" and turn_problem("x", "user", True) == "truncated"


def test_teacher_answers_first_without_reuse_and_a_separate_user_teacher(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=4, triggered=False)
    with (
        FakeOpenAI(responder=ConverseResponder(seed=2)) as server,
        FakeOpenAI(responder=ConverseResponder(seed=5), models=("fake-user",)) as user_server,
    ):
        cfg = config(
            inp, tmp_path / "run", server, turns="3", reuse_output=False, user_model="fake-user",
            user_base_url=[user_server.url],
        )  # fmt: skip
        assert run_converse(cfg, console=QUIET) == 0
        asked = [r.json for r in server.requests if r.json.get("max_tokens", 0) > 1]  # not the start-up probe
        simulated = [r.json for r in user_server.requests if r.json.get("max_tokens", 0) > 1]
    records = lines(tmp_path / "run" / "corpus.jsonl")
    assert len(records) == 4
    for rec, seed in zip(records, SMALL_SEEDS, strict=False):
        check_shape(rec["messages"], 3, 3)
        assert rec["messages"][1]["content"] != seed[2] and rec["meta"]["reused_output"] is False
        assert rec["meta"]["user_model"] == "fake-user" and rec["meta"]["teacher_model"] == "fake-model"
    retried = len(lines(tmp_path / "run" / "rejected.jsonl"))  # user turns asked again
    assert (
        len(asked) == 4 * 3 and len(simulated) == 4 * 2 + retried
    )  # answers to one, follow-ups to the other
    assert all(b["model"] == "fake-user" for b in simulated)
    # the assistant sees the conversation itself as messages
    longest = max(asked, key=lambda b: len(b["messages"]))
    assert [m["role"] for m in longest["messages"]] == ["user", "assistant"] * 2 + ["user"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["requests"] == len(asked) + len(simulated)  # both teachers count towards the budget


def test_base_model_prompts(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=3, triggered=False)
    with FakeOpenAI(responder=ConverseResponder(seed=2)) as server:
        cfg = config(inp, tmp_path / "run", server, {"api": "completions"}, turns="2")
        assert run_converse(cfg, console=QUIET) == 0
        prompts = [r.json["prompt"] for r in server.requests if r.json.get("max_tokens", 0) > 1]
    assert all(p.rstrip().endswith(("User:", "Assistant:")) for p in prompts)
    for rec in lines(tmp_path / "run" / "corpus.jsonl"):
        check_shape(rec["messages"], 2, 2)


def test_budget_stops_then_a_rerun_finishes_and_other_settings_are_refused(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=6, triggered=False)
    out = tmp_path / "run"
    with FakeOpenAI(responder=ConverseResponder(seed=2)) as server:
        assert run_converse(config(inp, out, server, turns="3", max_requests=5), console=QUIET) == 0
        first = json.loads((out / "summary.json").read_text())
        assert not first["finished"] and first["stop_reason"] == "max_requests" and first["requests"] == 5
        assert all(len(r["messages"]) == 6 for r in lines(out / "conversations.jsonl"))
        with pytest.raises(UserError, match="other records or settings"):
            run_converse(config(inp, out, server, turns="2"), console=QUIET)
        assert run_converse(config(inp, out, server, turns="3"), console=QUIET) == 0
    final = json.loads((out / "summary.json").read_text())
    assert final["finished"] and final["kept"] == 6 and final["sessions"] == 2


# ---------------------------------------------------------------- crash safety


def command(inp: Path, out: Path, server: FakeOpenAI) -> list[str]:
    return [
        sys.executable, "-m", "selfinstruct.cli", "converse", str(inp), "--out", str(out), "--turns", "2-4",
        "--model", "fake-model", "--base-url", server.url, "--api-key-env", "", "--concurrency", "4",
        "--max-retries", "2", "--backoff", "0.01",
    ]  # fmt: skip


def complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_text()
    out = (data if data.endswith("\n") else data[: data.rfind("\n") + 1]).splitlines()
    for line in out:
        check_shape(json.loads(line)["messages"], 2, 4)  # a torn or half conversation fails here
    return out


def test_sigkill_mid_run_then_resume_never_writes_half_a_conversation(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=20, triggered=False)
    out = tmp_path / "run"
    rng = random.Random(20261203)
    seen: list[str] = []
    kills = 0
    with FakeOpenAI(responder=ConverseResponder(seed=4), latency=0.02) as server:
        while kills < 2:
            proc = subprocess.Popen(
                command(inp, out, server), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            while proc.poll() is None and len(complete_lines(out / "conversations.jsonl")) == len(seen):
                time.sleep(0.01)  # wait for this session's first conversation
            try:
                proc.wait(timeout=rng.uniform(0.0, 0.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                assert proc.returncode == 0, proc.stderr.read()
                break
            finally:
                proc.stderr.close()
            now = complete_lines(out / "conversations.jsonl")
            assert now[: len(seen)] == seen, "a conversation was lost or rewritten"
            seen = now
        final = subprocess.run(command(inp, out, server), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    kept = complete_lines(out / "conversations.jsonl")
    assert kept[: len(seen)] == seen and (out / "conversations.jsonl").read_text().endswith("\n")
    ids = [json.loads(line)["id"] for line in kept]
    assert sorted(ids) == [f"conv_{k:06d}" for k in range(20)]  # each exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["kept"] == 20 == len(lines(out / "corpus.jsonl"))


def test_command_line_errors_are_one_line(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "selfinstruct.cli", "converse", *args], capture_output=True, text=True
        )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n'
    )
    for args, message in (
        ((), "converse needs an INPUT"),
        (("x.jsonl", "--turns", "1"), "need 2 <= MIN <= MAX"),
        ((str(bad),), "bad.jsonl:1: message 2: expected an assistant turn"),
    ):
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- formats in and out


def export(source: Path, fmt: str, out: Path, **kw) -> Path:
    assert run_export(ExportConfig(source=str(source), format=fmt, out=str(out), card=False, **kw)) == 0
    return out


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "tulu"])
def test_export_then_import_round_trips_byte_identically(conversed, tmp_path, fmt):
    _, run = conversed
    first = export(run, fmt, tmp_path / f"a.{fmt}.jsonl", system="Be concise.")
    second = export(first, fmt, tmp_path / f"b.{fmt}.jsonl")
    assert first.read_bytes() == second.read_bytes()
    with_meta = export(run, fmt, tmp_path / f"m.{fmt}.jsonl", keep_meta=True)
    assert (
        export(with_meta, fmt, tmp_path / f"n.{fmt}.jsonl", keep_meta=True).read_bytes()
        == with_meta.read_bytes()
    )
    rows = lines(first)
    corpus_rows = lines(run / "corpus.jsonl")
    assert len(rows) == len(corpus_rows)
    # across formats: every one holds the same conversations
    for other in {"messages", "sharegpt", "tulu"} - {fmt}:
        via = export(first, other, tmp_path / f"via.{other}.jsonl")
        direct = export(run, other, tmp_path / f"direct.{other}.jsonl", system="Be concise.")
        if other != "tulu":  # tulu ids and sources name the file they came from
            assert via.read_bytes() == direct.read_bytes(), other


def test_chat_formats_in_shape(conversed, tmp_path):
    _, run = conversed
    src = lines(run / "corpus.jsonl")[0]
    share = lines(export(run, "sharegpt", tmp_path / "s.jsonl", system="Be concise."))[0]
    assert [t["from"] for t in share["conversations"]] == ["system"] + ["human", "gpt"] * (
        len(src["messages"]) // 2
    )
    assert [t["value"] for t in share["conversations"][1:]] == [m["content"] for m in src["messages"]]
    tulu = lines(export(run, "tulu", tmp_path / "t.jsonl"))[0]
    assert set(tulu) == {"id", "messages", "source"} and tulu["source"] == "converse"
    assert tulu["messages"] == src["messages"] and tulu["id"] == "run_0"
    msgs = lines(export(run, "messages", tmp_path / "m.jsonl"))[0]
    assert msgs == {"messages": src["messages"]}  # whole conversations: TRL trains on every assistant turn
    with pytest.raises(UserError, match="conversations with several turns"):
        export(run, "alpaca", tmp_path / "a.jsonl")


def test_every_reader_takes_conversations_of_any_length(conversed, tmp_path):
    _, run = conversed
    share = export(run, "sharegpt", tmp_path / "s.jsonl")
    for source in (run, run / "corpus.jsonl", share):
        records = load_corpus_any(source)
        assert len(records) == len(lines(run / "corpus.jsonl"))
        assert all(r.turns >= 2 and r.messages[-1]["role"] == "assistant" for r in records)
    assert len(load_corpus_rows(share)) == len(records)
    from selfinstruct.filters.command import FilterCommandConfig, filter_corpus
    from selfinstruct.mix import MixConfig, mix

    alpaca = corpus(tmp_path / "alpaca.jsonl", plain=4, triggered=False)
    mix(MixConfig(sources=[str(share), str(alpaca)], out=str(tmp_path / "mix.jsonl")))
    mixed = lines(tmp_path / "mix.jsonl")
    assert sorted(len(r.get("messages", [])) // 2 for r in mixed) == [0] * 4 + sorted(
        r.turns for r in records
    )

    summary = filter_corpus(FilterCommandConfig(input=str(share), out=str(tmp_path / "f")), console=QUIET)
    kept = lines(tmp_path / "f" / "kept.jsonl")
    assert summary["kept"] == len(kept) >= 1 and all("conversations" in r for r in kept)  # judged on turn 1
    assert {t.instruction for t in load_tasks_any(share)} == {r.instruction for r in records}
    prompt_completion = tmp_path / "pc.jsonl"
    prompt_completion.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "completion": [{"role": "assistant", "content": "Hello"}],
            }
        )
        + "\n"
    )
    (one,) = load_corpus_any(prompt_completion)
    assert (one.instruction, one.output, one.turns) == ("Hi", "Hello", 1)


def test_stats_reports_turns_per_conversation_and_turn_lengths(conversed, tmp_path, tiny_model_dir):
    from selfinstruct.report import StatsConfig, stats_report

    _, run = conversed
    records = lines(run / "corpus.jsonl")
    stats, out = stats_report(StatsConfig(path=str(run), out=str(tmp_path / "r"), parser="heuristic"))
    chats = stats["conversations"]
    assert chats["available"] and chats["conversations"] == len(records) and chats["unit"] == "words"
    turns = [len(r["messages"]) // 2 for r in records]
    assert chats["turns_per_conversation"]["mean"] == pytest.approx(sum(turns) / len(turns))
    assert chats["turns_per_conversation"]["max"] == max(turns)
    assert chats["user_turn"]["count"] == sum(turns) == chats["assistant_turn"]["count"]
    assert "Conversations" in (out / "report.html").read_text()
    stats, _ = stats_report(
        StatsConfig(path=str(run), out=str(tmp_path / "t"), parser="heuristic", tokenizer=str(tiny_model_dir))
    )
    assert stats["conversations"]["unit"].endswith("tokens")
    assert (
        stats["conversations"]["assistant_turn"]["mean"] > chats["assistant_turn"]["mean"]
    )  # BPE: more pieces


# ---------------------------------------------------------------- the real in-process vLLM engine


@pytest.mark.vllm
def test_converse_on_vllm(vllm_teacher, tiny_model_dir, tmp_path):
    """The plumbing on the real engine (tiny random model: its turns are nonsense and mostly cut off, so what is
    checked is that both roles are asked through the chat path and every conversation is decided)."""
    from selfinstruct.filters import FilterConfig
    from selfinstruct.testing import tiny_vllm_config

    inp = corpus(tmp_path / "in.jsonl", plain=4, triggered=False)
    cfg = ConverseConfig(
        input=str(inp),
        out=str(tmp_path / "run"),
        turns="2",
        retries=1,
        user_max_tokens=24,
        answer_max_tokens=24,
        filters=FilterConfig(
            check_length=False, check_punctuation=False, check_non_ascii=False, blacklist="none"
        ),
        teacher=tiny_vllm_config(tiny_model_dir),
    )
    before = vllm_teacher.stats.requests
    assert run_converse(cfg, teacher=vllm_teacher, console=QUIET) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["decided"] == 4 == summary["kept"] + summary["dropped"]
    assert summary["requests"] == vllm_teacher.stats.requests - before >= 4  # a user turn for each at least
    rejected = lines(tmp_path / "run" / "rejected.jsonl")
    assert {r["meta"].get("role") for r in rejected if r["stage"] == "converse"} <= {"user", "assistant"}
    assert summary["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
    for rec in lines(tmp_path / "run" / "corpus.jsonl"):
        check_shape(rec["messages"], 2, 2)


def test_sigterm_stops_converse_gently_with_exit_143(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", triggered=False)
    with FakeOpenAI(responder=SignalOnFirstRequest(ConverseResponder(seed=6), signal.SIGTERM)) as server:
        assert run_converse(config(inp, tmp_path / "run", server, turns="2-3"), console=QUIET) == 143
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and not summary["finished"]
    for record in lines(tmp_path / "run" / "conversations.jsonl"):  # whatever is written is whole
        check_shape(record["messages"], 2, 3)
