"""`selfinstruct generate` end to end against the fake OpenAI-compatible server: both pipelines, chat and base
model prompts, messy and faulty answers, budget caps, resume, reproducibility, and what lands in the run dir."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from selfinstruct.config import load_toml, resolve
from selfinstruct.errors import UserError
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.pipeline.runner import drive
from selfinstruct.records import InstructionRecord
from selfinstruct.teachers import TeacherConfig
from selfinstruct.teachers.base import Choice, Teacher, TeacherRequest, TeacherResponse, TeacherStats
from selfinstruct.testing import FakeOpenAI, Reply
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def config(
    seeds: Path, out: Path, server: FakeOpenAI, teacher: dict | None = None, **settings
) -> GenerateConfig:
    t = {
        "model": "fake-model",
        "base_url": [server.url],
        "api_key_env": "",
        "concurrency": 8,
        "max_retries": 2,
    }
    t.update({"backoff": 0.01, "timeout": 5.0, **(teacher or {})})
    return GenerateConfig(
        seeds=str(seeds),
        out=str(out),
        num_instructions=settings.pop("num_instructions", 30),
        teacher=TeacherConfig(**t),
        **settings,
    )


def lines(path: Path) -> list[dict]:
    """Every line must be complete JSON: a torn or broken line fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def generation_requests(server: FakeOpenAI) -> list[dict]:
    """Requests the pipeline sent (the teacher's 1-token start-up probe excluded)."""
    return [
        r.json
        for r in server.completions()
        if (r.json.get("max_tokens") or r.json.get("max_completion_tokens")) != 1 or r.json.get("logprobs")
    ]


class Faulty:
    """Wrap a responder and answer chosen generation requests (by arrival number) with a fault instead."""

    def __init__(self, inner, faults: dict[int, Reply]):
        self.inner, self.faults, self.n = inner, faults, 0

    def __call__(self, request: dict):
        if request.get("max_tokens") == 1 and not request.get("logprobs"):
            return self.inner(request)
        self.n += 1
        return self.faults.get(self.n) or self.inner(request)


def check_run(out: Path, target: int, pipeline: str = "self-instruct") -> dict:
    """Invariants of every finished run directory."""
    kept = lines(out / "instructions.jsonl")
    assert len(kept) == target
    ids = [r["id"] for r in kept]
    assert len(set(ids)) == len(ids)
    texts = [r["instruction"].lower() for r in kept]
    assert len(set(texts)) == len(texts)
    for r in kept:
        assert InstructionRecord.from_dict(r).to_dict() == r  # the record shape of rundir.KeptRecord
        assert r["origin"] == "machine" and r["meta"]["pipeline"] == pipeline and r["meta"]["prompt_hash"]
        assert r["meta"]["seed_ids"] and len(r["most_similar"]) <= 10
        assert all(score <= 0.7 for score in r["most_similar"].values())
    for r in lines(out / "rejected.jsonl"):
        assert r["reason"] and r["stage"] in ("bootstrap", "alpaca", "classify", "instances")
        if r["reason"] == "too_similar":
            assert r["nearest"]["score"] > 0.7
    corpus = lines(out / "corpus.jsonl")
    assert corpus and all(set(r) == {"instruction", "input", "output", "meta"} for r in corpus)
    assert {r["meta"]["task_id"] for r in corpus} <= set(ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["kept"] == target and summary["corpus_records"] == len(corpus)
    assert summary["pipeline"] == pipeline
    assert "[generate]" in (out / "config.toml").read_text()
    return summary


def test_self_instruct_chat_structured_end_to_end(seeds, tmp_path):
    with FakeOpenAI(responder=PipelineResponder(seed=1)) as server:
        cfg = config(seeds, tmp_path / "run", server, teacher={"concurrency": 2}, num_instructions=40)
        assert run_generate(cfg) == 0
        sent = generation_requests(server)
    out = tmp_path / "run"
    summary = check_run(out, 40)
    kinds = Counter(
        json.dumps(r["response_format"]["json_schema"]["schema"]["required"])
        for r in sent
        if not r.get("logprobs")
    )
    assert kinds['["instructions"]'] == summary["stages"]["bootstrap"]["requests"]
    assert kinds['["instances"]'] == 40 and len(kinds) == 2
    # classify: logprob scoring, 3 content-free calibration requests and one 1-token request per instruction
    scored = [r for r in sent if r.get("logprobs")]
    assert len(scored) == 3 + 40 and all(r["max_tokens"] == 1 and r["top_logprobs"] == 20 for r in scored)
    labels = {r["id"]: r["is_classification"] for r in lines(out / "classification.jsonl")}
    assert len(labels) == 40 and any(labels.values()) and not all(labels.values())
    generated = {r["id"]: r for r in lines(out / "instances.jsonl")}
    assert all(generated[i]["output_first"] == labels[i] for i in labels)  # classification -> output-first
    # the reference's first prompts show only seeds; later ones 2 machine + 6 seed instructions
    kept = lines(out / "instructions.jsonl")
    assert kept[0]["meta"]["machine_ids"] == [] and len(kept[0]["meta"]["seed_ids"]) == 8
    assert any(len(r["meta"]["machine_ids"]) == 2 and len(r["meta"]["seed_ids"]) == 6 for r in kept)
    bootstrap = next(r for r in sent if "instructions" in json.dumps(r.get("response_format")))
    assert bootstrap["temperature"] == 1.0 and "stop" not in bootstrap  # chat preset


def test_kept_instructions_are_novel_by_rouge_score(seeds, tmp_path):
    """Exactness end to end: every kept instruction has rouge-score F <= 0.7 against seeds and earlier kept ones."""
    from rouge_score import rouge_scorer

    with FakeOpenAI(responder=PipelineResponder(seed=2)) as server:
        run_generate(config(seeds, tmp_path / "run", server, num_instructions=25, stages=["bootstrap"]))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = [t["instruction"] for t in small_seed_tasks()]
    for rec in lines(tmp_path / "run" / "instructions.jsonl"):
        assert max(scorer.score(rec["instruction"], p)["rougeL"].fmeasure for p in pool) <= 0.7
        pool.append(rec["instruction"])
    for rec in lines(tmp_path / "run" / "rejected.jsonl"):
        if rec["reason"] == "too_similar":
            assert scorer.score(rec["instruction"], rec["nearest"]["instruction"])["rougeL"].fmeasure > 0.7


def test_self_instruct_base_model_uses_reference_prompts_and_discards_truncated(seeds, tmp_path):
    responder = Faulty(PipelineResponder(seed=3), {2: Reply.length(" Write a poem\n10. Sort the")})
    with FakeOpenAI(responder=responder) as server:
        cfg = config(
            seeds,
            tmp_path / "run",
            server,
            teacher={"api": "completions"},
            num_instructions=20,
            classify_scoring="label",  # the reference's written label
        )
        assert run_generate(cfg) == 0
        sent = generation_requests(server)
    out = tmp_path / "run"
    check_run(out, 20)
    first = sent[0]
    assert first["prompt"].endswith("\n9.") and "\n8. " in first["prompt"]
    assert first["stop"] == ["\n\n", "\n16", "16.", "16 ."]
    assert (first["temperature"], first["top_p"], first["presence_penalty"], first["max_tokens"]) == (
        0.7,
        0.5,
        2,
        1024,
    )
    assert "response_format" not in first
    truncated = [r for r in lines(out / "rejected.jsonl") if r["reason"] == "truncated"]
    assert len(truncated) == 1 and "Sort the" in truncated[0]["instruction"]  # discarded whole
    assert not any(r["instruction"] == "Sort the" for r in lines(out / "instructions.jsonl"))
    classify = next(r for r in sent if r["prompt"].rstrip().endswith("Classification:"))
    assert classify["max_tokens"] == 3 and classify["temperature"] == 0 and "logprobs" not in classify
    instances = [r for r in sent if r["prompt"].split("Task:")[-1].strip() and "Example 1" in r["prompt"]]
    assert instances and instances[0]["presence_penalty"] == 1.5


def test_alpaca_chat_with_messy_answers_and_faults(seeds, tmp_path, monkeypatch):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("SELFINSTRUCT_TEST_KEY", key)
    faults = {
        2: Reply.server_error(500),
        3: Reply.rate_limited(0.05),
        4: Reply.truncated_body(),
        5: Reply.garbage_text(7),
        6: Reply.empty_body(),
    }
    responder = Faulty(PipelineResponder(seed=4, messy=True, truncate_rate=0.2), faults)
    with FakeOpenAI(responder=responder) as server:
        cfg = config(
            seeds,
            tmp_path / "run",
            server,
            teacher={"api_key_env": "SELFINSTRUCT_TEST_KEY", "structured_output": False},
            pipeline="alpaca",
            num_instructions=60,
        )
        assert run_generate(cfg) == 0
        assert server.completions()[-1].headers.get("authorization") == f"Bearer {key}"
    out = tmp_path / "run"
    summary = check_run(out, 60, pipeline="alpaca")
    assert summary["retries"] >= 3 and summary["parse_failures"] >= 1
    assert summary["stages"]["alpaca"]["rejected_by_reason"]["unparseable"] >= 1
    corpus = lines(out / "corpus.jsonl")
    assert any(r["input"] for r in corpus) and any(not r["input"] for r in corpus)
    assert not any(r["input"] == "<noinput>" for r in corpus)
    for path in out.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path


def test_alpaca_base_model_prompt_and_truncation(seeds, tmp_path):
    responder = PipelineResponder(seed=5, truncate_rate=0.5)
    with FakeOpenAI(responder=responder) as server:
        cfg = config(
            seeds,
            tmp_path / "run",
            server,
            teacher={"api": "completions"},
            pipeline="alpaca",
            num_instructions=30,
        )
        run_generate(cfg)
        sent = generation_requests(server)
    check_run(tmp_path / "run", 30, pipeline="alpaca")
    first = sent[0]
    assert first["prompt"].endswith("\n4. Instruction:") and first["prompt"].count("Instruction:") == 4
    assert first["stop"] == ["\n24", "24.", "24 ."]
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (1.0, 1.0, 3072)


def test_concurrency_keeps_requests_in_flight(seeds, tmp_path):
    with FakeOpenAI(responder=PipelineResponder(seed=6), latency=0.05) as server:
        run_generate(config(seeds, tmp_path / "run", server, num_instructions=60, stages=["bootstrap"]))
        assert server.max_in_flight == 8


def test_seeded_run_at_concurrency_1_is_reproducible(seeds, tmp_path):
    outputs = []
    for name in ("a", "b"):
        with FakeOpenAI(responder=PipelineResponder(seed=7, messy=True)) as server:
            cfg = config(
                seeds, tmp_path / name, server, teacher={"concurrency": 1}, num_instructions=15, seed=11
            )
            run_generate(cfg)
        outputs.append(
            [
                (tmp_path / name / f).read_bytes()
                for f in ("instructions.jsonl", "rejected.jsonl", "corpus.jsonl")
            ]
        )
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ({"max_requests": 5}, "max_requests"),
        ({"max_tokens": 3000}, "max_tokens"),
        ({"max_cost": 0.001}, "max_cost"),
    ],
)
def test_budget_caps_stop_the_run(seeds, tmp_path, caps, reason):
    prices = {"price_input": 1.0, "price_output": 1.0}  # USD per 1M tokens: 1000 tokens = $0.001
    with FakeOpenAI(responder=PipelineResponder(seed=8)) as server:
        cfg = config(
            seeds,
            tmp_path / "run",
            server,
            teacher={"concurrency": 2, **prices},
            num_instructions=500,
            **caps,
        )
        assert run_generate(cfg) == 0
        n_sent = len(generation_requests(server))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == reason and not summary["finished"]
    if reason == "max_requests":
        assert n_sent == summary["requests"] == 5
    elif reason == "max_tokens":
        tokens = summary["prompt_tokens"] + summary["completion_tokens"]
        assert tokens >= 3000 and n_sent <= summary["requests"] and summary["requests"] < 30
    else:
        assert summary["cost"] >= 0.001 and summary["requests"] < 30
    assert summary["stages"]["classify"]["requests"] == 0  # later teacher stages do not start


def test_resume_continues_and_a_finished_run_sends_nothing(seeds, tmp_path):
    out = tmp_path / "run"
    with FakeOpenAI(responder=PipelineResponder(seed=9)) as server:
        run_generate(config(seeds, out, server, num_instructions=20, stages=["bootstrap"]))
        first = lines(out / "instructions.jsonl")
        run_generate(config(seeds, out, server, num_instructions=35))
        check_run(out, 35)
        assert lines(out / "instructions.jsonl")[:20] == first  # append-only: earlier records untouched
        n = len(generation_requests(server))
        # what `selfinstruct generate --config OUT/config.toml` resolves to
        saved = resolve("generate", GenerateConfig, {}, load_toml(out / "config.toml"))
        run_generate(saved)
        assert len(generation_requests(server)) == n
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sessions"] == 3 and summary["finished"]


def test_later_stages_only_do_what_is_missing(seeds, tmp_path):
    out = tmp_path / "run"
    with FakeOpenAI(responder=PipelineResponder(seed=10)) as server:
        run_generate(config(seeds, out, server, num_instructions=20))
        keep = (out / "classification.jsonl").read_text().splitlines()[:12]
        (out / "classification.jsonl").write_text("\n".join(keep) + "\n")
        (out / "instances.jsonl").write_text("")
        n = len(generation_requests(server))
        run_generate(config(seeds, out, server, num_instructions=20))
        resent = generation_requests(server)[n:]
    kinds = Counter(
        "classify" if r.get("logprobs") else r["response_format"]["json_schema"]["schema"]["required"][0]
        for r in resent
    )
    assert kinds == {"classify": 8, "instances": 20}  # the calibration is in state.json: not asked again
    check_run(out, 20)


def test_prompt_dir_overrides_templates(seeds, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "bootstrap.chat.txt").write_text(
        '[user]\nMARKER-42 examples:\n{{tasks}}\nGive {{count}} more as JSON: {"instructions": [...]}\nWrite {{count}} new tasks.\n'
    )
    with FakeOpenAI(responder=PipelineResponder(seed=12)) as server:
        run_generate(
            config(
                seeds,
                tmp_path / "run",
                server,
                num_instructions=10,
                stages=["bootstrap"],
                prompt_dir=str(prompts),
            )
        )
        sent = generation_requests(server)
    users = [m for r in sent for m in r["messages"] if m["role"] == "user"]
    assert users and all(m["content"].startswith("MARKER-42") for m in users)  # the demonstration's turn too
    assert all(r["messages"][0]["role"] == "user" for r in sent)  # no [system] section in the override
    (prompts / "bootstrap.chat.txt").write_text("[user]\n{{tasks}} {{nope}}\n")
    with pytest.raises(UserError, match=r"bootstrap.chat.txt: unknown placeholder \{\{nope\}\}"):
        run_generate(GenerateConfig(seeds=str(seeds), out=str(tmp_path / "run2"), prompt_dir=str(prompts)))


def test_run_dir_of_another_pipeline_or_seeds_is_refused(seeds, tmp_path):
    out = tmp_path / "run"
    with FakeOpenAI(responder=PipelineResponder(seed=13)) as server:
        run_generate(config(seeds, out, server, num_instructions=5, stages=["bootstrap"]))
        before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
        with pytest.raises(UserError, match="holds a self-instruct run"):
            run_generate(config(seeds, out, server, pipeline="alpaca"))
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()[:10]))
        with pytest.raises(UserError, match="other seeds"):
            run_generate(config(other, out, server))
        assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before  # nothing overwritten
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        with pytest.raises(UserError, match="not a generate run"):
            run_generate(config(seeds, foreign, server))


def test_cli_errors_are_one_line_exit_2(seeds, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "selfinstruct.cli", "generate", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad_seeds = tmp_path / "bad.jsonl"
    bad_seeds.write_text('{"id": "a", "instruction": "x", "instances": []}\n')
    for args, message in [
        ((str(bad_seeds), "--out", str(tmp_path / "r1")), "bad.jsonl:1"),
        ((str(seeds), "--pipeline", "alpaca", "--stages", "classify"), "not a stage of the alpaca pipeline"),
        (
            (
                str(seeds),
                "--out",
                str(tmp_path / "r2"),
                "--base-url",
                "http://127.0.0.1:9/v1",
                "--api-key-env",
                "",
            ),
            "cannot reach",
        ),
    ]:
        out = cli(*args)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


def test_a_teacher_that_always_fails_stops_the_run(seeds, tmp_path):
    def refuse(request: dict):
        if request.get("max_tokens") == 1:
            return "OK"
        return Reply(status=400, error="context length exceeded")

    with (
        FakeOpenAI(responder=refuse) as server,
        pytest.raises(UserError, match=r"failed 20 requests in a row.*context length exceeded"),
    ):
        run_generate(config(seeds, tmp_path / "run", server))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["failed_requests"] >= 20


def test_a_teacher_that_repeats_itself_runs_out_of_patience(seeds, tmp_path):
    same = json.dumps({"instructions": ["Suggest a name for a cat that loves to sleep in boxes."]})
    with FakeOpenAI(responder=lambda request: same) as server:
        assert run_generate(config(seeds, tmp_path / "run", server, patience=10, stages=["bootstrap"])) == 0
        assert len(generation_requests(server)) < 30
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["bootstrap"]["stopped"] == "no_progress" and summary["kept"] == 0
    assert summary["rejected_by_reason"]["duplicate"] >= 10


class _CountsEarly(Teacher):
    """A teacher that, like the HTTP backend, counts a request a moment before its call returns."""

    model, concurrency = "early", 4

    def __init__(self) -> None:
        self.stats = TeacherStats()

    async def generate(self, requests):
        await asyncio.sleep(0.001 * random.random())
        self.stats.requests += len(requests)
        await asyncio.sleep(0.002 * random.random())  # the gap: counted, but the call has not finished
        return [TeacherResponse(r, [Choice("x", "stop")]) for r in requests]


class _Source:
    """Caps requests the way the run budget does: requests the teacher has counted + requests in flight."""

    def __init__(self, teacher: Teacher, cap: int):
        self.teacher, self.cap, self.sent, self.stopped = teacher, cap, 0, False

    def next_call(self, in_flight: int):
        self.stopped = (
            self.stopped or self.teacher.stats.requests + in_flight >= self.cap
        )  # a cap, once hit, holds
        if self.stopped:
            return None
        self.sent += 1
        return [TeacherRequest(prompt="p")]

    def handle(self, responses):
        pass

    def satisfied(self):
        return False

    def abandoned(self, requests):
        pass


def test_drive_reports_exact_in_flight_so_request_caps_are_exact():
    """Regression: a call counted by the teacher before its future finished was once counted twice."""
    for trial in range(20):
        random.seed(trial)
        teacher = _CountsEarly()
        source = _Source(teacher, cap=25)
        assert asyncio.run(drive(teacher, source, slots=4, stop=asyncio.Event()))
        assert teacher.stats.requests == source.sent == 25


@pytest.mark.parametrize(
    ("owned_by", "request_seed", "seeded"),
    [("fake", None, True), ("vllm", None, False), ("vllm", True, True), ("fake", False, False)],
)
def test_per_request_seeds_are_not_sent_to_a_vllm_server_by_default(
    seeds, tmp_path, owned_by, request_seed, seeded
):
    """vLLM's CPU build crashes on seeded requests: on auto, a server whose /models says vLLM gets none."""
    with FakeOpenAI(responder=PipelineResponder(seed=12), owned_by=owned_by) as server:
        cfg = config(
            seeds,
            tmp_path / "run",
            server,
            teacher={"request_seed": request_seed},
            num_instructions=5,
            stages=["bootstrap"],
        )
        assert run_generate(cfg) == 0
        sent = generation_requests(server)
    assert sent and all(("seed" in r) == seeded for r in sent)


def test_a_small_target_starts_with_a_few_requests_not_a_full_window(seeds, tmp_path):
    """20 instructions at 7 asked per prompt: about 6 requests in flight (prior yield 3.5), not --concurrency 32."""
    with FakeOpenAI(responder=PipelineResponder(seed=13), latency=0.2) as server:
        cfg = config(seeds, tmp_path / "run", server, teacher={"concurrency": 32}, num_instructions=20)
        cfg.stages = ["bootstrap"]
        assert run_generate(cfg) == 0
        sent = generation_requests(server)
        assert 4 <= server.max_in_flight <= 6
    assert len(sent) < 15
    check = json.loads((tmp_path / "run" / "summary.json").read_text())
    # requests cancelled once the target is met count as sent; some never reached the server
    assert check["kept"] == 20 and len(sent) <= check["stages"]["bootstrap"]["requests"] < 15
