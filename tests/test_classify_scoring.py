"""Classify by logprobs: top-k logprobs through each teacher, the yes/no score and its contextual calibration,
and the settings that choose it (the written label of the reference stays one flag away)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path

import pytest

from selfinstruct.config import add_arguments, config_to_toml, load_toml, resolve
from selfinstruct.errors import UserError
from selfinstruct.generate import GenerateConfig, _identity, run_generate
from selfinstruct.pipeline.classify import CONTENT_FREE, yes_no_score
from selfinstruct.teachers import Sampling, TeacherConfig, TeacherRequest, make_teacher
from selfinstruct.testing import FakeOpenAI, Reply
from selfinstruct.testing.responders import small_seed_tasks


def teacher_config(server: FakeOpenAI, **kw) -> TeacherConfig:
    settings = dict(model="fake-model", base_url=[server.url], api_key_env="", backoff=0.01, timeout=5.0)
    return TeacherConfig(**{**settings, **kw})


async def ask(cfg: TeacherConfig, requests: list[TeacherRequest]):
    teacher = make_teacher(cfg)
    await teacher.start()
    try:
        return await teacher.generate(requests)
    finally:
        await teacher.close()


# ------------------------------------------------------------------------------------------ the score


def test_score_sums_spellings_and_bounds_a_missing_answer():
    top = {" Yes": math.log(0.3), "Yes": math.log(0.1), " yes": math.log(0.1), " No": math.log(0.25)}
    assert yes_no_score(top) == pytest.approx(math.log(0.5 / 0.25))
    # "No" outside the top k: at most the mass the top k leave (0.1), tighter than the k-th logprob here
    top = {"Yes": math.log(0.6), "Maybe": math.log(0.3)}
    assert yes_no_score(top) == pytest.approx(math.log(0.6 / 0.1))
    # ... or the k-th logprob when that is smaller
    top = {"No": math.log(0.5), "1": math.log(0.01)}
    assert yes_no_score(top) == pytest.approx(math.log(0.01 / 0.5))
    assert yes_no_score({"Yes": 0.0}) > 20  # certain: not a tie at 0


# ------------------------------------------------------------------------------------------ teachers


def test_openai_teacher_returns_the_first_tokens_top_k():
    top = {"Yes": -0.2, " No": -1.9, "Maybe": -4.0, "1": -6.0}
    fake_openai = FakeOpenAI(responder=lambda request: Reply(text="Yes", top_logprobs=top)).start()
    chat = TeacherRequest(messages=[{"role": "user", "content": "?"}], sampling=Sampling(logprobs=3))
    raw = TeacherRequest(prompt="Q:", sampling=Sampling(logprobs=3))
    plain = TeacherRequest(prompt="Q:", sampling=Sampling())
    got = asyncio.run(ask(teacher_config(fake_openai), [chat]))
    got += asyncio.run(ask(teacher_config(fake_openai, api="completions"), [raw, plain]))
    fake_openai.stop()
    sent = [r.json for r in fake_openai.completions() if r.json.get("max_tokens") != 1]
    assert sent[0]["logprobs"] is True and sent[0]["top_logprobs"] == 3  # chat API
    assert sent[1]["logprobs"] == 3  # legacy completions API
    assert "logprobs" not in sent[2]
    expected = {"Yes": -0.2, " No": -1.9, "Maybe": -4.0}  # the server's top 3
    assert got[0].choices[0].top_logprobs == expected and got[1].choices[0].top_logprobs == expected
    assert got[2].choices[0].top_logprobs is None


def test_a_server_refusing_logprobs_stops_logprob_classification(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    out = tmp_path / "run"
    _seed_instructions(out, seeds, ["Classify the sentiment of the review."])
    with FakeOpenAI(reject_logprobs=True) as server:
        cfg = GenerateConfig(
            seeds=str(seeds), out=str(out), stages=["classify"], teacher=teacher_config(server)
        )
        with pytest.raises(UserError, match="--classify-scoring label"):
            run_generate(cfg)


@pytest.mark.vllm
def test_in_process_vllm_teacher_returns_top_logprobs(vllm_teacher):
    request = TeacherRequest(
        prompt="Is this spam?", sampling=Sampling(max_tokens=1, temperature=0, logprobs=5)
    )
    [response] = asyncio.run(vllm_teacher.generate([request]))
    top = response.choices[0].top_logprobs
    assert top is not None and 5 <= len(top) <= 6  # the top 5, plus the sampled token if it is not among them
    assert all(lp <= 0 for lp in top.values()) and sum(math.exp(lp) for lp in top.values()) <= 1 + 1e-4
    assert response.choices[0].text in top  # greedy: the sampled token is the most likely one
    assert max(top, key=top.__getitem__) == response.choices[0].text


# ------------------------------------------------------------------------------------------ the stage


def _seed_instructions(run: Path, seeds: Path, instructions: list[str]) -> None:
    """Make `run` a run directory whose kept instructions are `instructions` (the classify stage's input)."""
    run.mkdir()
    identity = _identity(GenerateConfig(seeds=str(seeds), out=str(run)))
    state = {"identity": identity, "usage": {}, "elapsed_s": 0.0, "sessions": 0}
    (run / "state.json").write_text(json.dumps(state))
    (run / "instructions.jsonl").write_text(
        "".join(
            json.dumps({"id": f"i{k}", "instruction": text, "round": 0}) + "\n"
            for k, text in enumerate(instructions)
        )
    )


TASKS = {
    "Classify the sentiment of the review.": True,
    "Is this email spam?": True,
    "Write a poem about the sea.": False,
    "Summarize the article in two sentences.": False,
}
# What the teacher answers: a lean towards "No" on every task (the content-free ones at −0.5 log-odds), so
# uncalibrated it calls the weak classification task "no"; calibrated it gets all four right.
LOG_ODDS = {"N/A": -0.3, "": -0.9, "[MASK]": -0.3, **dict(zip(TASKS, [0.7, -0.2, -2.0, -1.5], strict=True))}


def task_of(request: dict) -> str:
    """The task a classify request asks about (the last one its prompt shows)."""
    text = request["messages"][-1]["content"] if "messages" in request else request["prompt"]
    return text.rsplit("Task:", 1)[-1].split("\n", 1)[0].strip()


def responder(request: dict) -> Reply:
    p_yes = 0.9 / (1 + math.exp(-LOG_ODDS[task_of(request)]))  # 0.1 left for other tokens
    space = "" if "messages" in request else " "
    return Reply(text="x", top_logprobs={f"{space}Yes": math.log(p_yes), f"{space}No": math.log(0.9 - p_yes)})


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_calibration_subtracts_the_content_free_score(tmp_path, api):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    results = {}
    with FakeOpenAI(responder=responder) as server:
        for calibrate in (True, False):
            out = tmp_path / f"run-{calibrate}"
            _seed_instructions(out, seeds, list(TASKS))
            cfg = GenerateConfig(
                seeds=str(seeds), out=str(out), stages=["classify"], teacher=teacher_config(server, api=api),
                classify_scoring="logprob", classify_calibrate=calibrate,
            )  # fmt: skip
            assert run_generate(cfg) == 0
            results[calibrate] = [
                json.loads(line) for line in (out / "classification.jsonl").read_text().splitlines()
            ]
            summary = json.loads((out / "summary.json").read_text())["stages"]["classify"]
            calibration = summary["calibration"]  # asked for either way, applied only when on
            assert calibration["offset"] == pytest.approx(-0.5, abs=1e-3)
            assert calibration["content_free_scores"] == pytest.approx([-0.3, -0.9, -0.3], abs=1e-3)
            assert calibration["applied"] is calibrate
            assert summary["requests"] == len(TASKS) + len(CONTENT_FREE)
        sent = [r.json for r in server.completions() if r.json.get("logprobs")]
    assert all(r["max_tokens"] == 1 and r["temperature"] == 0 for r in sent)
    by_task = {k: {r["id"]: r for r in results[k]} for k in results}
    for i, (task, truth) in enumerate(TASKS.items()):
        raw, cal = by_task[False][f"i{i}"], by_task[True][f"i{i}"]
        assert raw["score"] == pytest.approx(LOG_ODDS[task], abs=1e-3)
        assert cal["score"] == pytest.approx(LOG_ODDS[task] + 0.5, abs=1e-3)
        assert cal["is_classification"] is truth
    assert [by_task[False][f"i{i}"]["is_classification"] for i in range(4)] == [True, False, False, False]


def sent(server: FakeOpenAI) -> tuple[int, int]:
    """Classify requests the server received: (content-free ones, task ones); not the start-up check."""
    tasks = [task_of(r.json) for r in server.completions()]
    return sum(t in CONTENT_FREE for t in tasks), sum(t in TASKS for t in tasks)


def test_calibration_requests_are_budgeted_counted_and_cached_for_a_resume(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    out = tmp_path / "run"
    _seed_instructions(out, seeds, list(TASKS))

    def config(**settings) -> GenerateConfig:
        return GenerateConfig(
            seeds=str(seeds), out=str(out), stages=["classify"], teacher=teacher_config(server), **settings
        )

    with FakeOpenAI(responder=responder) as server:
        assert run_generate(config(max_requests=2)) == 0  # the cap holds for the calibration requests too
        assert sent(server) == (2, 0)
        assert (out / "classification.jsonl").read_text() == ""
        assert run_generate(config(max_requests=7)) == 0  # calibration done, then 2 tasks within the cap
        first = json.loads((out / "summary.json").read_text())
        assert sent(server) == (2 + 3, 2)
        assert json.loads((out / "state.json").read_text())["classify_calibration"]["content_free_scores"]
        server.clear()
        assert run_generate(config()) == 0  # the resume reuses the measured offset: no content-free request
        assert sent(server) == (0, len(TASKS) - 2)
    stage = first["stages"]["classify"]
    assert stage["requests"] == first["requests"] - 2 == 5  # this session's 5, the run's 7
    assert stage["calibration"]["cached"] is False
    assert stage["prompt_tokens"] > 0 and first["stop_reason"] == "max_requests"
    # the calibration's tokens are the stage's: one session's stage usage is the run's usage minus the earlier
    state = json.loads((out / "state.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == state["usage"]["requests"] == 2 + 3 + len(TASKS)
    assert summary["stages"]["classify"]["calibration"] == {**stage["calibration"], "cached": True}
    scores = {r["id"]: r["score"] for r in map(json.loads, (out / "classification.jsonl").open())}
    assert scores == pytest.approx({f"i{i}": LOG_ODDS[t] + 0.5 for i, t in enumerate(TASKS)}, abs=1e-3)


def test_the_calibration_of_another_prompt_is_asked_again(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    out = tmp_path / "run"
    _seed_instructions(out, seeds, list(TASKS))
    with FakeOpenAI(responder=responder) as server:
        # one task per session; another --seed picks other examples, so the cached offset does not apply
        for seed, cap in ((0, 4), (0, 5), (1, 9)):
            cfg = GenerateConfig(
                seeds=str(seeds), out=str(out), stages=["classify"], teacher=teacher_config(server),
                seed=seed, max_requests=cap,
            )  # fmt: skip
            assert run_generate(cfg) == 0
        assert sent(server) == (3 + 0 + 3, 3)


# ------------------------------------------------------------------------------------------ settings


def test_scoring_flags_and_toml_round_trip(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    default = resolve("generate", GenerateConfig, vars(parser.parse_args([])))
    assert (default.classify_scoring, default.classify_calibrate) == ("logprob", True)
    argv = ["--classify-scoring", "label", "--no-classify-calibrate"]
    cfg = resolve("generate", GenerateConfig, vars(parser.parse_args(argv)))
    assert (cfg.classify_scoring, cfg.classify_calibrate) == ("label", False)
    saved = tmp_path / "config.toml"
    saved.write_text(config_to_toml("generate", cfg))
    again = resolve("generate", GenerateConfig, {}, load_toml(saved))
    assert (again.classify_scoring, again.classify_calibrate) == ("label", False)
    with pytest.raises(UserError, match="classify_scoring from --classify-scoring"):
        resolve("generate", GenerateConfig, vars(parser.parse_args(["--classify-scoring", "vote"])))
