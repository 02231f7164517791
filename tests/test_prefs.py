"""`selfinstruct prefs`: sampling, judging (absolute and pairwise), pairing, rejections and resume, against the
fake OpenAI server playing both the policy and the judge (`PrefsResponder`), and once with a real in-process
vLLM policy (the tiny model) for on-policy data."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from selfinstruct.cli import main
from selfinstruct.errors import UserError
from selfinstruct.prefs import (
    ASPECTS,
    PrefsConfig,
    parse_absolute,
    parse_pairwise,
    parse_policy,
    run_prefs,
)
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PrefsResponder, SignalOnFirstRequest, quality

PROMPTS = [
    "Explain how tides work.",
    "Give three tips for learning to juggle.",
    "Name a use of copper. [garbled]",
    "Describe a sunset in one sentence. [same]",
    "Suggest a name for a pet turtle.",
    "Why is the sky blue? [biased]",
    "List two benefits of walking.",
    "What does a compiler do? [biased]",
]


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"instruction": p, "input": "", "output": f"Reference answer {k}."} for k, p in enumerate(PROMPTS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge(url: str, **extra: Any) -> TeacherConfig:
    return TeacherConfig(
        **{"model": "fake-model", "base_url": [url], "api_key_env": "", "concurrency": 4, **extra}
    )


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_none(value: Any) -> bool:
    if isinstance(value, dict):
        return all(no_none(v) for v in value.values())
    if isinstance(value, list):
        return all(no_none(v) for v in value)
    return value is not None


def test_parse_judge_answers():
    assert parse_absolute('{"helpfulness": 4, "honesty": 5, "instruction_following": 2}') == {
        "helpfulness": 4,
        "honesty": 5,
        "instruction_following": 2,
    }
    assert parse_absolute('```json\n{"Helpfulness": 3, "honesty": "4", "instruction-following": 1}\n```') == {
        "helpfulness": 3,
        "honesty": 4,
        "instruction_following": 1,
    }
    assert parse_absolute("Helpfulness: 4/5. Honesty - 5. Instruction following: 3.") == {
        "helpfulness": 4,
        "honesty": 5,
        "instruction_following": 3,
    }
    assert parse_absolute('{"helpfulness": 4, "honesty": 5}') is None  # an aspect missing
    assert (
        parse_absolute('{"helpfulness": 9, "honesty": 5, "instruction_following": 1}') is None
    )  # out of range
    assert parse_absolute("A fine answer overall.") is None
    assert parse_pairwise('{"better": "B"}') == "B"
    assert parse_pairwise("A") == "A"
    assert parse_pairwise("Answer B is better.") == "B"
    assert parse_pairwise("The better answer is A") == "A"
    assert parse_pairwise('{"better": "tie"}') == "tie"
    assert parse_pairwise("Answer A is better. Actually, answer B is better.") is None  # both named
    assert parse_pairwise("Both have their charms.") is None


def test_policy_specs(tmp_path):
    assert parse_policy("openai:gpt-4o-mini@http://localhost:8000/v1") == parse_policy(
        "openai:gpt-4o-mini@http://localhost:8000/v1"
    )
    p = parse_policy("openai:org/model@http://host:1/v1")
    assert (p.backend, p.model, p.base_url) == ("openai", "org/model", "http://host:1/v1")
    p = parse_policy("openai:gpt-4o-mini")
    assert (p.backend, p.model, p.base_url) == ("openai", "gpt-4o-mini", None)
    assert parse_policy("vllm:outputs/sft").model == "outputs/sft"
    assert parse_policy("outputs/sft").backend == "vllm"
    with pytest.raises(UserError, match="include-reference"):
        parse_policy("reference")
    cfg = PrefsConfig(input=str(corpus(tmp_path)), out=str(tmp_path / "o"), policy=["vllm:/no/such/model"])
    with pytest.raises(UserError, match="/no/such/model"):
        run_prefs(cfg)
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_absolute_pairs_respect_the_margin_and_log_unparseable_verdicts(tmp_path):
    with FakeOpenAI(PrefsResponder()) as server:
        cfg = PrefsConfig(
            input=str(corpus(tmp_path)),
            out=str(tmp_path / "run"),
            policy=[f"openai:fake-model@{server.url}"],
            n=3,
            include_reference=True,
            min_margin=1.0,
            teacher=judge(server.url),
        )
        assert run_prefs(cfg) == 0
        pairs = read(tmp_path / "run" / "prefs.jsonl")
        rejected = read(tmp_path / "run" / "rejected.jsonl")
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["finished"] and summary["pairs"] == len(pairs) >= 4
        for pair in pairs:
            assert set(pair) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "meta"}
            assert pair["prompt"][0]["role"] == "user" and len(pair["prompt"]) == 1
            assert [m["role"] for m in pair["chosen"] + pair["rejected"]] == ["assistant", "assistant"]
            assert pair["score_chosen"] - pair["score_rejected"] >= cfg.min_margin
            # the judge's grades are the qualities the policy wrote: chosen is a best one, rejected the worst
            scores = pair["meta"]["scores"]
            assert pair["score_chosen"] == quality(pair["chosen"][0]["content"]) == max(scores.values())
            assert pair["score_rejected"] == quality(pair["rejected"][0]["content"]) == min(scores.values())
            assert set(pair["meta"]["aspects"]["chosen"]) == set(ASPECTS)
            assert json.loads(pair["meta"]["judge_raw"]["chosen"])["helpfulness"] == pair["score_chosen"]
            assert pair["meta"]["judge"] == "fake-model" and pair["meta"]["rubric"] == "absolute"
            assert "[garbled]" not in pair["prompt"][0]["content"]
            assert no_none(pair)
        reasons = {r["reason"] for r in rejected}
        garbled = [r for r in rejected if r["reason"] == "judge_unparseable"]
        assert garbled and all("[garbled]" in r["instruction"] and r["raw"] for r in garbled)
        assert "tie" in reasons  # [same]: every answer equally good (the reference scores 3 as well)
        assert (
            summary["rejected_by_reason"]["judge_unparseable"] == len(garbled) == 4
        )  # 3 samples + reference

        # resume: everything is on disk, so a rerun sends nothing and rebuilds the same pairs
        server.clear()
        assert run_prefs(cfg) == 0
        assert server.completions() == []
        assert read(tmp_path / "run" / "prefs.jsonl") == pairs


def test_pairwise_keeps_only_verdicts_that_agree_in_both_orders(tmp_path):
    with FakeOpenAI(PrefsResponder(prose=True)) as server:
        cfg = PrefsConfig(
            input=str(corpus(tmp_path)),
            out=str(tmp_path / "run"),
            policy=[f"openai:fake-model@{server.url}"],
            n=4,
            rubric="pairwise",
            pairing="best-vs-random-lower",
            min_margin=1.0,
            teacher=judge(server.url, structured_output=False),
        )
        assert run_prefs(cfg) == 0
    pairs = read(tmp_path / "run" / "prefs.jsonl")
    rejected = read(tmp_path / "run" / "rejected.jsonl")
    assert len(pairs) >= 3
    for pair in pairs:
        prompt = pair["prompt"][0]["content"]
        assert "[biased]" not in prompt and "[garbled]" not in prompt
        assert pair["score_chosen"] - pair["score_rejected"] >= cfg.min_margin
        assert quality(pair["chosen"][0]["content"]) > quality(pair["rejected"][0]["content"])
        raw = pair["meta"]["judge_raw"]  # chosen shown first, then second: the same answer won both times
        assert parse_pairwise(raw["chosen_first"]) == "A" and parse_pairwise(raw["rejected_first"]) == "B"
    biased = [r for r in rejected if "[biased]" in r["instruction"]]
    # every comparison of a position-biased verdict disagrees with itself across orders: no pair survives
    assert {r["reason"] for r in biased} == {"position_inconsistent", "no_agreeing_win"}
    assert sum(r["reason"] == "no_agreeing_win" for r in biased) == 2


def test_cli_refuses_a_run_without_candidates(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prefs", str(corpus(tmp_path)), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "--policy" in capsys.readouterr().err


def test_on_policy_answers_from_an_in_process_vllm_model(tmp_path, tiny_model_dir):
    """The student as the policy: a real vLLM engine on the tiny model writes the candidates."""
    with FakeOpenAI(PrefsResponder()) as server:
        cfg = PrefsConfig(
            input=str(corpus(tmp_path)),
            out=str(tmp_path / "run"),
            policy=[f"vllm:{tiny_model_dir}"],
            n=2,
            include_reference=True,
            max_records=3,
            sample_max_tokens=8,
            teacher=judge(
                server.url,
                dtype="float32",
                gpu_memory_utilization=0.1,
                enforce_eager=True,
                max_model_len=4096,
            ),
        )
        assert run_prefs(cfg) == 0
    samples = read(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 3 and all(len(s["completions"]) == 2 for s in samples)
    assert all(s["policy"] == f"vllm:{tiny_model_dir}" for s in samples)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"]
    # 8-token answers of a random model are mostly cut off: judged all the same (3 prompts x (2 + reference)) ...
    assert summary["stages"]["judge"]["total"] == 9
    cut = {
        (s["id"], f"{s['policy']}#{k}")
        for s in samples
        for k, c in enumerate(s["completions"])
        if c["finish_reason"] == "length"
    }
    assert cut  # the fixture exercises what it claims to
    # ... but never the chosen answer of a pair
    for pair in read(tmp_path / "run" / "prefs.jsonl"):
        meta = pair["meta"]
        assert (meta["id"], meta["candidates"]["chosen"]) not in cut
        assert meta["rejected_truncated"] == ((meta["id"], meta["candidates"]["rejected"]) in cut)


def test_a_budget_stop_resumes_to_the_same_pairs(tmp_path):
    with FakeOpenAI(PrefsResponder()) as server:

        def config(out: str, **extra: Any) -> PrefsConfig:
            return PrefsConfig(
                input=str(corpus(tmp_path)),
                out=str(tmp_path / out),
                policy=[f"openai:fake-model@{server.url}"],
                n=3,
                teacher=judge(server.url, concurrency=1),
                **extra,
            )

        assert run_prefs(config("whole")) == 0
        assert run_prefs(config("capped", max_requests=12)) == 0
        summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
        assert summary["stop_reason"] == "max_requests" and not summary["finished"]
        assert summary["requests"] == 12 and summary["pending"] > 0
        assert run_prefs(config("capped")) == 0  # the same command without the cap continues
        summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
        assert summary["finished"] and summary["sessions"] == 2
    assert read(tmp_path / "capped" / "prefs.jsonl") == read(tmp_path / "whole" / "prefs.jsonl")
    assert len(read(tmp_path / "capped" / "samples.jsonl")) == len(PROMPTS)  # nothing sampled twice


def test_sigterm_stops_prefs_gently_with_exit_143(tmp_path):
    with FakeOpenAI(SignalOnFirstRequest(PrefsResponder(), signal.SIGTERM)) as server:
        cfg = PrefsConfig(
            input=str(corpus(tmp_path)),
            out=str(tmp_path / "run"),
            policy=[f"openai:fake-model@{server.url}"],
            n=2,
            teacher=judge(server.url, concurrency=1),
        )
        assert run_prefs(cfg) == 143
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and not summary["finished"]
