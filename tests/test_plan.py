"""`selfinstruct plan`: estimates from rendered prompts against what a fake-server run really used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfinstruct.cli import parse_command
from selfinstruct.cli import run as cli_run
from selfinstruct.errors import UserError
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.plan import PlanConfig, TokenCounter, plan_generate, run_plan
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks


def used(run: Path) -> int:
    s = json.loads((run / "summary.json").read_text())
    return s["prompt_tokens"] + s["completion_tokens"]


def test_plan_is_within_25_percent_of_a_fake_server_run(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    with FakeOpenAI(PipelineResponder(seed=1)) as server:

        def cfg(n: int) -> GenerateConfig:
            teacher = TeacherConfig(
                model="fake-model", base_url=[server.url], api_key_env="", concurrency=4, max_retries=1
            )
            return GenerateConfig(
                seeds=str(seeds), out=str(tmp_path / "run"), num_instructions=n, teacher=teacher
            )

        cold = plan_generate(cfg(40), sample=10)
        assert cold["tokenizer"].startswith("~4 characters")  # the fake model has no tokenizer: said so
        assert [s["stage"] for s in cold["stages"]] == ["bootstrap", "classify", "instances"]
        # one classify request per instruction, and the 3 content-free ones of the calibration
        assert cold["stages"][1]["requests"]["expected"] == 40 + 3
        run_generate(cfg(40))
        first = used(tmp_path / "run")
        assert abs(cold["total"]["tokens"]["expected"] - first) / first < 0.25, (cold["total"], first)
        assert cold["total"]["tokens"]["low"] <= first <= cold["total"]["tokens"]["high"]

        # growing the same run: the plan now uses the usage and yield the run directory observed
        more = plan_generate(cfg(100), sample=10)
        assert all(s["completion_source"] == "observed" for s in more["stages"])
        assert more["stages"][1]["requests"]["expected"] == 60  # the run's state holds the calibration
        run_generate(cfg(100))
        second = used(tmp_path / "run") - first
        assert abs(more["total"]["tokens"]["expected"] - second) / second < 0.25, (more["total"], second)


def test_plan_cli_prices_and_batch_discount(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    argv = ["plan", "--json", "--sample", "3", "generate", str(seeds), "--out", str(tmp_path / "r")]
    argv += ["--model", "gpt-4o-mini", "--num-instructions", "1000", "--rpm", "60"]
    assert cli_run(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "r").exists()  # planning writes nothing
    assert plan["prices_per_1m"] == {"input": 0.15, "output": 0.6}
    classify = plan["stages"][1]
    assert classify["seconds"] >= 1000  # 1000 requests at 60 RPM take at least 1000 s
    expected = (classify["prompt_tokens"] * 0.15 + classify["completion_tokens"] * 0.6) / 1e6
    assert classify["cost"]["expected"] == pytest.approx(expected, rel=1e-3)
    assert classify["cost"]["low"] < classify["cost"]["expected"] < classify["cost"]["high"]
    with pytest.raises(UserError, match="cannot plan 'export'"):
        cli_run(["plan", "export", str(tmp_path)])


def test_hf_tokenizer_counts_the_chat_template(tiny_model_dir: Path) -> None:
    counter = TokenCounter(str(tiny_model_dir), in_process=True)
    assert counter.method.startswith("Hugging Face tokenizer")
    messages = [{"role": "user", "content": "Name three colours."}]
    assert counter.request(messages, None) > counter.count("Name three colours.")


def test_run_plan_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    cfg = GenerateConfig(seeds=str(seeds), out=str(tmp_path / "r"), pipeline="alpaca", num_instructions=100)
    run_plan(PlanConfig(sample=2), "generate", cfg)
    out = capsys.readouterr().out
    assert "alpaca" in out and "total" in out and "tokens counted with" in out


def test_plan_evolve_against_a_fake_server_run(tmp_path: Path) -> None:
    from rich.console import Console

    from selfinstruct.evolve import EvolveConfig, run_evolve
    from selfinstruct.plan import plan_evolve
    from selfinstruct.testing.responders import EvolveResponder

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"instruction": t["instruction"], "input": "", "output": t["instances"][0]["output"]})
            + "\n"
            for t in small_seed_tasks()[:10]
        )
    )
    with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", concurrency=4)
        cfg = EvolveConfig(input=str(inp), out=str(tmp_path / "run"), teacher=teacher, rounds=2)
        plan = plan_evolve(cfg, sample=10)
        assert [s["stage"] for s in plan["stages"]] == ["evolve", "judge", "answer"]
        assert plan["stages"][0]["requests"]["expected"] == 20  # 10 records × 2 rounds
        assert run_evolve(cfg, console=Console(stderr=True, quiet=True)) == 0
    measured = used(tmp_path / "run")
    t = plan["total"]["tokens"]
    assert t["low"] <= measured <= t["high"]
    assert abs(t["expected"] - measured) / measured < 0.3, (t, measured)  # measured here: -19%


def test_plan_with_the_batch_api_prices_at_half_and_counts_batch_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfinstruct.evolve import EvolveConfig
    from selfinstruct.plan import plan_evolve

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    argv = ["plan", "--json", "--sample", "3", "generate", str(seeds), "--out", str(tmp_path / "r")]
    argv += ["--model", "gpt-4o-mini", "--num-instructions", "1000", "--concurrency", "100"]
    assert cli_run(argv) == 0
    direct = json.loads(capsys.readouterr().out)
    assert cli_run([*argv, "--batch-api"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prices_per_1m"] == {"input": 0.075, "output": 0.3} and plan["batch_window_h"] == 24
    assert plan["total"]["cost"]["expected"] == pytest.approx(
        direct["total"]["cost"]["expected"] / 2, rel=1e-3
    )
    bootstrap, classify, instances = plan["stages"]
    # a bootstrap batch holds --concurrency prompts; classify and instances send every instruction in one
    assert bootstrap["batch_steps"] == -(-bootstrap["requests"]["expected"] // 100) > 1
    assert classify["batch_steps"] == instances["batch_steps"] == 1
    assert all(s["seconds"] is None for s in plan["stages"]) and plan["total"]["seconds"] is None
    steps = bootstrap["batch_steps"] + 2
    assert plan["total"]["batch_steps"] == steps and plan["total"]["max_seconds"] == steps * 24 * 3600

    _, cfg, _ = parse_command(["generate", *argv[5:], "--batch-api"])
    run_plan(PlanConfig(sample=2), "generate", cfg)
    out = capsys.readouterr().out
    assert "up to 24 h per batch step" in out and "batch steps, so up to" in out and " s " not in out

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Red"}) + "\n")
    teacher = TeacherConfig(model="gpt-4o-mini", batch_api=True)
    evolve = plan_evolve(EvolveConfig(input=str(inp), out=str(tmp_path / "e"), teacher=teacher, rounds=3), 2)
    # each round's rewrite, judge and answer batches follow one another
    assert [s["batch_steps"] for s in evolve["stages"]] == [3, 3, 3] and evolve["total"]["batch_steps"] == 9
