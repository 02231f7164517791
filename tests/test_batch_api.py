"""`--batch-api`: stages as Batch API jobs against the fake server's Files/Batches endpoints, at batch prices,
resumed after kill -9 without resubmitting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfinstruct.errors import UserError
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI, Reply
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

MODEL = "gpt-4o-mini"  # a priced model, so batch prices show


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def config(seeds: Path, out: Path, server: FakeOpenAI, **settings) -> GenerateConfig:
    teacher = TeacherConfig(
        model=MODEL,
        base_url=[server.url],
        api_key_env="",
        concurrency=8,
        max_retries=1,
        backoff=0.01,
        batch_api=settings.pop("batch_api", True),
        batch_poll=0.05,
    )
    return GenerateConfig(seeds=str(seeds), out=str(out), num_instructions=20, teacher=teacher, **settings)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_run_matches_a_direct_run_at_half_the_price(seeds: Path, tmp_path: Path) -> None:
    with FakeOpenAI(PipelineResponder(seed=3), models=[MODEL], batch_delay=0.2) as server:
        run_generate(config(seeds, tmp_path / "base", server, stages=["bootstrap"], batch_api=False))
        for name in ("batch", "direct"):
            (tmp_path / name).mkdir()
            for f in ("instructions.jsonl", "state.json"):
                (tmp_path / name / f).write_bytes((tmp_path / "base" / f).read_bytes())
        # written labels: every request of both stages goes in a batch (logprob scoring: the next test)
        stages = {"stages": ["classify", "instances", "finetune"], "classify_scoring": "label"}
        run_generate(config(seeds, tmp_path / "batch", server, **stages))
        assert server.batch_creations == 2  # one per stage
        run_generate(config(seeds, tmp_path / "direct", server, batch_api=False, **stages))
        assert server.batch_creations == 2
    for name in ("classification.jsonl", "instances.jsonl", "corpus.jsonl"):  # same records, any order
        batch_records = sorted(map(json.dumps, lines(tmp_path / "batch" / name)))
        assert batch_records == sorted(map(json.dumps, lines(tmp_path / "direct" / name)))
    base, batch, direct = (
        json.loads((tmp_path / name / "summary.json").read_text()) for name in ("base", "batch", "direct")
    )
    assert batch["prompt_tokens"] == direct["prompt_tokens"] > base["prompt_tokens"]
    assert batch["cost"] - base["cost"] == pytest.approx((direct["cost"] - base["cost"]) / 2, rel=0.01)
    events = [line["event"] for line in lines(tmp_path / "batch" / "batches.jsonl")]
    assert events == ["prepared", "submitted", "finished"] * 2


def test_logprob_classification_in_a_batch_matches_a_direct_run(seeds: Path, tmp_path: Path) -> None:
    with FakeOpenAI(PipelineResponder(seed=5), models=[MODEL], batch_delay=0.1) as server:
        run_generate(config(seeds, tmp_path / "base", server, stages=["bootstrap"], batch_api=False))
        for name in ("batch", "direct"):
            (tmp_path / name).mkdir()
            for f in ("instructions.jsonl", "state.json"):
                (tmp_path / name / f).write_bytes((tmp_path / "base" / f).read_bytes())
        run_generate(config(seeds, tmp_path / "batch", server, stages=["classify"]))
        # the 3 content-free calibration requests ride in the one batch: nothing is sent directly
        assert server.batch_creations == 1
        [batch_file] = (tmp_path / "batch" / "batches").iterdir()
        tags = [json.loads(line)["tag"][0] for line in batch_file.read_text().splitlines()]
        assert len(tags) == sum(bool(r.json.get("logprobs")) for r in server.completions()) == 20 + 3
        assert sorted(t for t in tags if t.startswith("content-free-")) == [
            f"content-free-{i}" for i in range(3)
        ]
        run_generate(config(seeds, tmp_path / "direct", server, stages=["classify"], batch_api=False))
    batch, direct = (lines(tmp_path / name / "classification.jsonl") for name in ("batch", "direct"))
    assert len(batch) == 20 and "score" in batch[0]
    assert sorted(map(json.dumps, batch)) == sorted(map(json.dumps, direct))
    base, batch_run, direct_run = (
        json.loads((tmp_path / name / "summary.json").read_text()) for name in ("base", "batch", "direct")
    )
    assert batch_run["stages"]["classify"]["requests"] == direct_run["stages"]["classify"]["requests"] == 23
    assert batch_run["requests"] == base["requests"] + 23  # in the run's usage, and at batch prices:
    assert batch_run["cost"] - base["cost"] == pytest.approx(
        (direct_run["cost"] - base["cost"]) / 2, rel=0.01
    )


def test_a_resumed_batch_run_does_not_calibrate_again(seeds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with FakeOpenAI(PipelineResponder(seed=5), models=[MODEL], batch_delay=0.05) as server:
        run_generate(config(seeds, out, server, stages=["bootstrap"], batch_api=False))
        instructions = (out / "instructions.jsonl").read_text().splitlines(keepends=True)
        (out / "instructions.jsonl").write_text("".join(instructions[:15]))  # 5 come later
        run_generate(config(seeds, out, server, stages=["classify"]))
        (out / "instructions.jsonl").write_text("".join(instructions))
        run_generate(config(seeds, out, server, stages=["classify"]))
        asked = sum(bool(r.json.get("logprobs")) for r in server.completions())
    assert server.batch_creations == 2 and asked == 15 + 3 + 5  # nothing sent besides the batches
    sizes = [line["requests"] for line in lines(out / "batches.jsonl") if line["event"] == "prepared"]
    assert sizes == [15 + 3, 5]  # the second batch: only the new instructions
    assert len(lines(out / "classification.jsonl")) == 20
    calibration = json.loads((out / "summary.json").read_text())["stages"]["classify"]["calibration"]
    assert calibration["cached"] is True


def test_a_failed_calibration_line_stops_the_run_and_the_rerun_asks_anew(seeds: Path, tmp_path: Path) -> None:
    out, answers, refuse = tmp_path / "run", PipelineResponder(seed=5), [True]

    def responder(request: dict) -> Reply | str:  # refuses the content-free "[MASK]" task once
        if refuse[0] and "[MASK]" in json.dumps(request):
            refuse[0] = False
            return Reply.server_error(400)
        return answers(request)

    with FakeOpenAI(responder, models=[MODEL]) as server:
        run_generate(config(seeds, out, server, stages=["bootstrap"], batch_api=False))
        with pytest.raises(UserError, match="classify calibration failed"):
            run_generate(config(seeds, out, server, stages=["classify"]))
        # the batch is closed as unusable, so the rerun does not fail on the same answers again
        assert run_generate(config(seeds, out, server, stages=["classify"])) == 0
    assert server.batch_creations == 2 and len(lines(out / "classification.jsonl")) == 20
    finished = [line.get("status") for line in lines(out / "batches.jsonl") if line["event"] == "finished"]
    assert finished == ["unusable", "completed"]


def test_failed_batch_lines_are_retried_and_alpaca_rounds_batch(seeds: Path, tmp_path: Path) -> None:
    with FakeOpenAI(PipelineResponder(seed=4), models=[MODEL]) as server:
        run_generate(config(seeds, tmp_path / "a", server, stages=["bootstrap"], batch_api=False))
        server.script(Reply.server_error(500), Reply.server_error(500))  # two lines of the batch fail
        run_generate(config(seeds, tmp_path / "a", server, stages=["classify"], classify_scoring="label"))
        assert server.batch_creations == 2  # the two failed instructions go into a second batch
        assert len(lines(tmp_path / "a" / "classification.jsonl")) == 20
        run_generate(config(seeds, tmp_path / "b", server, pipeline="alpaca"))
        assert len(lines(tmp_path / "b" / "instructions.jsonl")) == 20
        assert server.batch_creations >= 3


def test_batch_api_with_the_in_process_engine_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from selfinstruct.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--teacher", "vllm", "--model", "x", "--batch-api"])
    assert (
        exit_.value.code == 2 and "--batch-api needs the OpenAI-compatible teacher" in capsys.readouterr().err
    )


def test_a_server_without_batches_is_a_one_line_error(seeds: Path, tmp_path: Path) -> None:
    with (
        FakeOpenAI(PipelineResponder(seed=4), models=[MODEL], batch_api=False) as server,
        pytest.raises(UserError, match=r"Batch API at .*HTTP 404"),
    ):
        run_generate(config(seeds, tmp_path / "a", server, stages=["bootstrap"]))


def test_kill_9_between_submit_and_download_resumes_without_resubmitting(seeds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with FakeOpenAI(PipelineResponder(seed=5), models=[MODEL], batch_delay=3600) as server:
        run_generate(config(seeds, out, server, stages=["bootstrap"], batch_api=False))
        cmd = [
            sys.executable, "-m", "selfinstruct.cli", "generate", str(seeds), "--out", str(out),
            "--num-instructions", "20", "--stages", "classify", "--model", MODEL, "--base-url", server.url,
            "--api-key-env", "", "--batch-api", "--batch-poll", "0.05",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = out / "batches.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and "submitted" in log.read_text()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # it is polling now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert server.batch_creations == 1
        assert not (out / "classification.jsonl").exists() or not lines(out / "classification.jsonl")
        for batch in server.batches.values():
            batch["_ready_at"] = 0.0  # the provider finishes the batch while nobody is watching
        run_generate(config(seeds, out, server, stages=["classify"]))
        assert server.batch_creations == 1  # picked up, not resubmitted
    labels = lines(out / "classification.jsonl")
    assert sorted(r["id"] for r in labels) == sorted(r["id"] for r in lines(out / "instructions.jsonl"))
    assert [line["event"] for line in lines(log)] == ["prepared", "submitted", "finished"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["classify"]["finished"]


def test_evolve_rounds_go_as_batches(tmp_path: Path) -> None:
    """Evolve's steps (rewrite, judge, answer) depend on each other per lineage, not across lineages: each
    step of all lineages goes as one batch, and every lineage gets its one outcome per round."""
    from rich.console import Console

    from selfinstruct.evolve import EvolveConfig, run_evolve
    from selfinstruct.testing.responders import EvolveResponder

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"instruction": t["instruction"], "input": "", "output": t["instances"][0]["output"]})
            + "\n"
            for t in small_seed_tasks()[:8]
        )
    )
    with FakeOpenAI(responder=EvolveResponder(seed=1), models=["fake-model"]) as server:
        teacher = TeacherConfig(
            model="fake-model", base_url=[server.url], api_key_env="", batch_api=True, batch_poll=0.05
        )
        cfg = EvolveConfig(input=str(inp), out=str(tmp_path / "run"), teacher=teacher, rounds=2)
        assert run_evolve(cfg, console=Console(stderr=True, quiet=True)) == 0
        created = server.batch_creations
    outcomes = lines(tmp_path / "run" / "evolved.jsonl") + lines(tmp_path / "run" / "rejected.jsonl")
    decided = sorted((r["meta"]["evol"]["root_id"], r["meta"]["evol"]["round"]) for r in outcomes)
    assert decided == sorted((f"root_{k:06d}", r) for k in range(8) for r in (1, 2))
    assert (
        2 <= created <= 2 * 3 + 2
    )  # a handful of batches (steps × rounds, plus retries), not one per request


def test_a_batch_created_but_not_journaled_is_found_by_its_label(seeds: Path, tmp_path: Path) -> None:
    """A kill between creating the batch and journaling its id: the rerun finds it in the provider's list."""
    out = tmp_path / "run"
    with FakeOpenAI(PipelineResponder(seed=6), models=[MODEL]) as server:
        run_generate(config(seeds, out, server, stages=["bootstrap"], batch_api=False))
        run_generate(config(seeds, out, server, stages=["classify"]))
        assert server.batch_creations == 1
        # roll the run back to the moment after `create`: only the `prepared` line, no answers on disk
        log = out / "batches.jsonl"
        log.write_text(log.read_text().splitlines()[0] + "\n")
        (out / "classification.jsonl").unlink()
        run_generate(config(seeds, out, server, stages=["classify"]))
        assert server.batch_creations == 1  # found by label, not created again
    assert len(lines(out / "classification.jsonl")) == 20
    assert [line["event"] for line in lines(log)] == ["prepared", "submitted", "finished"]


def test_select_judge_goes_as_one_batch_with_the_direct_scores(tmp_path: Path) -> None:
    import random

    from selfinstruct.select import SelectConfig, select
    from selfinstruct.testing.raters import RatingResponder

    responder, rng = PipelineResponder(7), random.Random(5)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(responder._task(rng)) + "\n" for _ in range(25)))
    with FakeOpenAI(responder=RatingResponder(), models=[MODEL]) as server:

        def cfg(out: str, batch: bool) -> SelectConfig:
            teacher = TeacherConfig(
                model=MODEL, base_url=[server.url], api_key_env="", batch_api=batch, batch_poll=0.05
            )
            return SelectConfig(
                input=str(corpus), out=str(tmp_path / out), n=8, score=["judge"], teacher=teacher
            )

        direct = select(cfg("direct", False))
        batched = select(cfg("batched", True))
        assert server.batch_creations == 1
    assert lines(tmp_path / "batched" / "selected.jsonl") == lines(tmp_path / "direct" / "selected.jsonl")
    assert batched["teacher_usage"]["cost"] == pytest.approx(direct["teacher_usage"]["cost"] / 2, rel=0.01)
