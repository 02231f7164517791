"""`selfinstruct evolve` against the fake OpenAI-compatible server: eliminations, retries, reproducible operations,
resume after kill -9, `--rounds 0`, base-model and plain-text prompts, the `stats` report of an evolve run; and one
run on the real in-process vLLM engine (tiny random model: its rewrites are nonsense, so the filters are opened
up to let them reach the judge and the answer step; what is checked is the plumbing, not the quality)."""

from __future__ import annotations

import io
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

from selfinstruct.errors import UserError
from selfinstruct.evolve import (
    OPS,
    EvolveConfig,
    draw_op,
    format_task,
    parse_evolved,
    parse_judge,
    run_evolve,
    sorry_short,
    stopwords_only,
)
from selfinstruct.filters import FilterConfig
from selfinstruct.prompts import Prompts
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI, Reply, tiny_vllm_config
from selfinstruct.testing.responders import SMALL_SEEDS, EvolveResponder, SignalOnFirstRequest

QUIET = Console(stderr=True, quiet=True)

# Distinct tasks (so ROUGE-L novelty between fixtures never interferes), one per trigger of EvolveResponder.
TRIGGERED = {
    "leak": "Plan a three-day hiking trip through the Scottish highlands for beginners [leak]",
    "copy": "Write a limerick about a forgetful robot that loses its keys [copy]",
    "equal": "Estimate how many litres of water a household of four uses per week [equal]",
    "short": "Translate a polite complaint about late train departures into German [short]",
    "broken": "Suggest names for a bakery that only sells sourdough bread and pastries [broken]",
    "sorry": "Outline the history of the printing press in five key events [sorry]",
    "stop": "Describe how volcanic eruptions affect global temperatures over decades [stop]",
    "flaky": "Recommend three board games for a family with young children on holiday [flaky]",
    "twin1": "Compose a haiku about autumn leaves falling on a quiet city street [twin]",
    "twin2": "Give reasons why octopuses are considered intelligent sea creatures [twin]",
}


def corpus(path: Path, plain: int = 8, triggered: bool = True) -> Path:
    records = [{"instruction": i, "input": x, "output": o} for i, x, o, _ in SMALL_SEEDS[:plain]]
    if triggered:
        records += [{"instruction": text, "input": "", "output": "ok"} for text in TRIGGERED.values()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(inp: Path, out: Path, server: FakeOpenAI, teacher: dict | None = None, **settings) -> EvolveConfig:
    t = {"model": "fake-model", "base_url": [server.url], "api_key_env": "", "concurrency": 1}
    t.update({"max_retries": 1, "backoff": 0.01, "timeout": 5.0, **(teacher or {})})
    return EvolveConfig(input=str(inp), out=str(out), teacher=TeacherConfig(**t), **settings)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def outcomes(out: Path) -> dict[tuple[str, int], dict]:
    """(root, round) -> its one outcome line (survivor or rejection); fails on a second one."""
    found: dict[tuple[str, int], dict] = {}
    for rec in lines(out / "evolved.jsonl") + lines(out / "rejected.jsonl"):
        evol = rec["meta"]["evol"]
        key = (evol["root_id"], evol["round"])
        assert key not in found, f"two outcomes for {key}"
        found[key] = rec
    return found


def check_lineages(out: Path, roots: int, rounds: int) -> None:
    """Every lineage decided once per round 1..rounds; survivors chain parent -> child with depth + 1."""
    found = outcomes(out)
    assert sorted(found) == sorted((f"root_{k:06d}", r) for k in range(roots) for r in range(1, rounds + 1))
    depth = {f"root_{k:06d}": 0 for k in range(roots)}
    latest = {root: root for root in depth}
    for (root, round_), rec in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        evol = rec["meta"]["evol"]
        assert evol["parent_id"] == latest[root] and evol["depth"] == depth[latest[root]] + 1
        if "reason" not in rec:
            assert rec["id"] == f"{root}.r{round_}"
            latest[root], depth[rec["id"]] = rec["id"], evol["depth"]


@pytest.fixture(scope="module")
def evolved_run(tmp_path_factory) -> Path:
    """A 3-round run over 8 plain and 10 triggered records, one request in flight (a deterministic order)."""
    tmp = tmp_path_factory.mktemp("evolve")
    inp = corpus(tmp / "in.jsonl")
    with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
        assert run_evolve(config(inp, tmp / "run", server, rounds=3, seed=3), console=QUIET) == 0
    return tmp / "run"


def by_trigger(run: Path) -> dict[str, list[dict]]:
    roots = {f"root_{8 + k:06d}": name for k, name in enumerate(TRIGGERED)}
    out: dict[str, list[dict]] = {name: [] for name in TRIGGERED}
    for (root, _), rec in sorted(outcomes(run).items(), key=lambda kv: kv[0][1]):
        if root in roots:
            out[roots[root]].append(rec)
    return out


def test_every_elimination_rule_is_hit_and_logged_with_its_reason(evolved_run):
    check_lineages(evolved_run, 18, 3)
    got = by_trigger(evolved_run)
    expected = {
        "leak": "evol_prompt_leak",
        "copy": "evol_equal",
        "equal": "evol_equal",
        "short": "too_short",
        "broken": "unparseable",
        "sorry": "evol_sorry_short",
        "stop": "evol_stopwords_only",
    }
    for name, reason in expected.items():
        assert [r.get("reason") for r in got[name]] == [reason] * 3, name
    assert {r["meta"]["judge"] for r in got["copy"]} == {"copy"}  # an exact copy needs no judge
    assert {r["meta"]["judge"] for r in got["equal"]} == {"equal"}  # the teacher judged it equal
    assert all("sorry" in r["meta"]["answer"] for r in got["sorry"])
    assert all(r["stage"] == "evolve" and r["meta"]["step"] for r in lines(evolved_run / "rejected.jsonl"))
    twins = got["twin1"] + got["twin2"]
    assert "too_similar" in {r.get("reason") for r in twins}  # novelty against everything kept so far
    assert any(r.get("nearest") for r in twins if r.get("reason") == "too_similar")
    summary = json.loads((evolved_run / "summary.json").read_text())
    assert summary["finished"] and summary["records"] == 18 and summary["target"] == 54
    logged = Counter(r["reason"] for r in lines(evolved_run / "rejected.jsonl"))
    assert summary["rejected_by_reason"] == dict(logged)
    assert summary["kept"] == len(lines(evolved_run / "evolved.jsonl")) == 54 - sum(logged.values())
    for round_, r in summary["by_round"].items():
        assert r["attempts"] == 18 and r["survived"] == sum(o["survived"] for o in r["by_op"].values())
        assert r["survived"] + sum(r["rejected_by_reason"].values()) == 18, round_


def test_failed_items_return_to_the_pool_and_are_retried_next_round(evolved_run):
    got = by_trigger(evolved_run)
    sorry = got["sorry"]
    assert [r["meta"]["evol"]["round"] for r in sorry] == [1, 2, 3]
    assert {r["meta"]["evol"]["parent_id"] for r in sorry} == {"root_000013"}  # the same parent each round
    flaky = got["flaky"]  # leaks once, then evolves normally from the same parent
    assert flaky[0]["reason"] == "evol_prompt_leak"
    assert "reason" not in flaky[1] and flaky[1]["meta"]["evol"] == {
        "parent_id": "root_000015",
        "root_id": "root_000015",
        "op": flaky[1]["meta"]["evol"]["op"],
        "round": 2,
        "depth": 1,
    }
    assert flaky[2]["meta"]["evol"]["parent_id"] == flaky[1]["id"] and flaky[2]["meta"]["evol"]["depth"] == 2
    assert flaky[2]["instruction"].startswith(flaky[1]["instruction"])  # an in-depth rewrite of the survivor


def test_survivors_carry_provenance_and_corpus_holds_originals_plus_survivors(evolved_run, tmp_path):
    survivors = lines(evolved_run / "evolved.jsonl")
    assert survivors and all(r["output"] and r["meta"]["evol"]["op"] in OPS for r in survivors)
    assert max(r["meta"]["evol"]["depth"] for r in survivors) == 3
    originals = [json.loads(line) for line in corpus(tmp_path / "in.jsonl").read_text().splitlines()]
    corpus_lines = lines(evolved_run / "corpus.jsonl")
    assert corpus_lines[: len(originals)] == originals
    assert [r["instruction"] for r in corpus_lines[len(originals) :]] == [r["instruction"] for r in survivors]
    assert all("id" not in r and r["meta"]["task_id"] for r in corpus_lines[len(originals) :])
    # ready for `train` and `export`, which read a run directory's corpus.jsonl
    from selfinstruct.export import load_source
    from selfinstruct.train import load_corpus

    assert len(load_corpus(str(evolved_run))[1]) == len(corpus_lines)
    assert len(load_source(evolved_run).records) == len(corpus_lines)


def test_novelty_is_checked_again_against_what_was_kept_while_in_flight(tmp_path):
    """Two rewrites in flight at once both pass the first check; the one decided second meets the first at keep."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"instruction": TRIGGERED[k], "output": "ok"}) + "\n" for k in ("twin1", "twin2"))
    )
    with FakeOpenAI(responder=EvolveResponder(seed=1), latency=0.05) as server:
        cfg = config(inp, tmp_path / "run", server, teacher={"concurrency": 8}, rounds=1, ops=["deepen"])
        assert run_evolve(cfg, console=QUIET) == 0
        sent = [r.json for r in server.completions() if r.json.get("max_tokens") != 1]
    # structured output: the rewrite and the judge ask for their JSON schema, the answer is free text
    schemas = [r.get("response_format", {}).get("json_schema", {}).get("schema", {}) for r in sent]
    assert sorted(",".join(sorted(s.get("properties", {}))) for s in schemas) == [
        "",
        "",
        "equal",
        "equal",
        "input,instruction",
        "input,instruction",
    ]
    (kept,) = lines(tmp_path / "run" / "evolved.jsonl")
    (rejected,) = lines(tmp_path / "run" / "rejected.jsonl")
    assert rejected["reason"] == "too_similar" and rejected["meta"]["step"] == "answer"  # after the answer
    assert rejected["nearest"]["instruction"] == kept["instruction"] and rejected["nearest"]["score"] > 0.7


def test_a_request_that_fails_after_all_retries_is_tried_again(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=3, triggered=False)
    responder, failed = EvolveResponder(seed=1), []

    def flaky(request: dict):  # the first answer request gets a 400: it fails at once, without retries
        if request.get("max_tokens") != 1 and "response_format" not in request and not failed:
            failed.append(request)
            return Reply(status=400, error="this request is refused")
        return responder(request)

    with FakeOpenAI(responder=flaky) as server:
        assert run_evolve(config(inp, tmp_path / "run", server, rounds=1), console=QUIET) == 0
    check_lineages(tmp_path / "run", 3, 1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["failed_requests"] == 1 and summary["retries"] == 0
    assert summary["requests"] == 3 * 3 + 1  # rewrite, judge, answer per record, and the failed answer again


def test_a_larger_rounds_extends_a_finished_run_and_other_input_is_refused(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=4, triggered=False)
    with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
        assert run_evolve(config(inp, tmp_path / "run", server, rounds=1), console=QUIET) == 0
        first = (tmp_path / "run" / "evolved.jsonl").read_text()
        assert run_evolve(config(inp, tmp_path / "run", server, rounds=2), console=QUIET) == 0
        check_lineages(tmp_path / "run", 4, 2)
        assert (tmp_path / "run" / "evolved.jsonl").read_text().startswith(first)
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["sessions"] == 2
        with pytest.raises(UserError, match="evolved other records"):
            run_evolve(config(inp, tmp_path / "run", server, rounds=2, max_records=2), console=QUIET)


def test_ops_are_drawn_uniformly_and_reproducibly_under_seed(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=12, triggered=False)

    def run(name: str, seed: int, **settings) -> tuple[dict, str]:
        with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
            assert run_evolve(config(inp, tmp_path / name, server, seed=seed, **settings), console=QUIET) == 0
            prompts = [r.json["messages"][-1]["content"] for r in server.completions()]
        ops = {key: rec["meta"]["evol"]["op"] for key, rec in outcomes(tmp_path / name).items()}
        return ops, prompts, (tmp_path / name / "evolved.jsonl").read_text()

    a, _, evolved_a = run("a", 5, rounds=2)
    b, _, evolved_b = run("b", 5, rounds=2)
    c, _, _ = run("c", 6, rounds=2)
    assert a == b and evolved_a == evolved_b  # same seed: same draws, same requests, same survivors
    assert a != c
    assert a == {(root, r): draw_op(5, root, r, list(OPS)) for root, r in a}
    draws = Counter(draw_op(0, f"root_{k:06d}", 1, list(OPS)) for k in range(6000))
    assert set(draws) == set(OPS) and max(draws.values()) / min(draws.values()) < 1.15  # uniform
    d, prompts, _ = run("d", 5, rounds=2, ops=["deepen", "breadth"], judge_equal="off")
    assert set(d.values()) <= {"deepen", "breadth"} and len(set(d.values())) == 2
    deepen = sum(1 for p in prompts if "ask about causes, consequences, trade-offs" in p)
    breadth = sum(1 for p in prompts if "brand-new task" in p)
    assert deepen == Counter(d.values())["deepen"] and breadth == Counter(d.values())["breadth"]
    assert not any('{"equal": true}' in p for p in prompts)  # --judge-equal off: no judge requests


def test_rounds_zero_returns_the_input_unchanged_without_a_teacher(tmp_path):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue", "meta": {"task_id": "t1"}},
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    ]
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(records, indent=2))  # an Alpaca JSON array
    cfg = EvolveConfig(
        input=str(inp),
        out=str(tmp_path / "run"),
        rounds=0,
        teacher=TeacherConfig(model="m", base_url=["http://127.0.0.1:9/v1"], api_key_env=""),  # unreachable
    )
    assert run_evolve(cfg, console=QUIET) == 0
    assert lines(tmp_path / "run" / "corpus.jsonl") == records
    assert lines(tmp_path / "run" / "evolved.jsonl") == []
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["requests"] == 0 and summary["corpus_records"] == 2


@pytest.mark.parametrize("mode", ["completions", "plain-chat"])
def test_base_model_and_plain_text_answers(tmp_path, mode):
    inp = corpus(tmp_path / "in.jsonl", plain=6, triggered=False)
    teacher = {"api": "completions"} if mode == "completions" else {"structured_output": False}
    with FakeOpenAI(responder=EvolveResponder(seed=2, structured=False)) as server:
        cfg = config(inp, tmp_path / "run", server, teacher={**teacher, "concurrency": 4}, rounds=2)
        assert run_evolve(cfg, console=QUIET) == 0
        sent = [r.json for r in server.completions() if r.json.get("max_tokens") != 1]
    check_lineages(tmp_path / "run", 6, 2)
    assert all("response_format" not in r for r in sent)
    if mode == "completions":
        assert all(r["prompt"].rstrip().endswith(("Instruction:", "Answer:", "### Response:")) for r in sent)
    survivors = lines(tmp_path / "run" / "evolved.jsonl")
    assert len(survivors) >= 6  # most rewrites of plain tasks survive
    assert all(not r["instruction"].lower().startswith(("instruction", "here is")) for r in survivors)


@pytest.mark.parametrize("style", ["chat", "completion"])
def test_every_operation_has_its_own_template_in_both_styles(style):
    prompts, task = Prompts(style), format_task("Name a colour.", "")
    texts = {}
    for op in (*OPS, "judge", "answer"):
        values = {"task": task, "instruction": "Name a colour.", "input": "", "first": task, "second": task}
        messages, prompt = prompts.get(f"evol_{op}").render(**values, prompt="Name a colour.")
        assert (messages is None) == (style == "completion")
        texts[op] = prompt if messages is None else "\n".join(m["content"] for m in messages)
        assert "Name a colour." in texts[op], op
        if style == "completion" and op in OPS:
            assert texts[op].rstrip().endswith("Instruction:"), op  # a base model continues the rewrite
    assert len(set(texts.values())) == len(texts)  # one wording per operation


def test_parsers_and_answer_rules():
    assert parse_evolved('{"instruction": " Do  X ", "input": "<noinput>"}', "keep") == ("Do X", "")
    assert parse_evolved('{"instruction": "Do X"}', "keep") == ("Do X", "keep")
    assert parse_evolved('{"instruction": "Do', "keep") is None
    assert parse_evolved('{"instruction": "Do\x0c X", "input": ""}', "keep") == (
        "Do X",
        "",
    )  # raw control char
    assert parse_evolved("Sure!\n\n**Instruction:** Do X\n**Input:** a table", "") == ("Do X", "a table")
    assert parse_evolved("Do X better.", "in") == ("Do X better.", "in")
    assert parse_evolved('{"instruction": "Do X", "input": "..."}', "in") == (
        "Do X",
        "",
    )  # no letter: no input
    assert parse_evolved("  ", "in") is None
    assert parse_judge('{"equal": false}') is False and parse_judge("Equal.") is True
    assert parse_judge("They are not equal") is False and parse_judge("Yes") is True
    assert parse_judge("hmm") is None
    assert sorry_short("Sorry, I cannot do that.", 80) and not sorry_short("sorry " * 80, 80)
    assert not sorry_short("I am unable to help.", 80)
    assert stopwords_only("It is what it is!") and stopwords_only("") and not stopwords_only("It is 42.")


def test_flags_defaults_and_the_shared_teacher_and_filters_tables(tmp_path):
    from selfinstruct.cli import parse_command

    _, cfg, _ = parse_command(["evolve", "in.jsonl"])
    assert cfg.rounds == 4 and cfg.chosen_ops() == list(OPS) and cfg.answer and cfg.judge_equal == "teacher"
    assert cfg.include_originals and cfg.max_records is None and cfg.seed == 0
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[teacher]\nmodel = "m"\nconcurrency = 7\n[filters]\nthreshold = 0.5\n[evolve]\nrounds = 2\n'
    )
    _, cfg, _ = parse_command(
        [
            "evolve", "in.jsonl", "--config", str(toml), "--ops", "complicate_input,breadth", "--no-answer",
            "--judge-equal", "off", "--max-records", "3", "--seed", "9", "--max-requests", "10",
            "--max-cost", "1.5", "--max-tokens", "900", "--no-include-originals",
        ]
    )  # fmt: skip
    assert (cfg.teacher.model, cfg.teacher.concurrency, cfg.filters.threshold, cfg.rounds) == ("m", 7, 0.5, 2)
    assert cfg.chosen_ops() == ["complicate_input", "breadth"] and not cfg.answer and cfg.judge_equal == "off"
    assert (cfg.max_records, cfg.seed, cfg.max_requests, cfg.max_cost, cfg.max_tokens) == (3, 9, 10, 1.5, 900)
    assert not cfg.include_originals


def test_seed_file_and_run_directory_inputs_no_answer_max_records_and_a_budget(tmp_path):
    seeds = Path(__file__).parents[1] / "seeds" / "seed_tasks.jsonl"  # the seed format: instances
    with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
        first = config(
            seeds, tmp_path / "a", server, rounds=1, max_records=5, answer=False, judge_equal="off"
        )
        shown = io.StringIO()
        assert run_evolve(first, console=Console(file=shown, width=200)) == 0
        sent = [r.json for r in server.completions() if r.json.get("max_tokens") != 1]
        assert len(sent) == 5  # --max-records 5, one rewrite each: no judge, no answer
        survivors = lines(tmp_path / "a" / "evolved.jsonl")
        assert survivors and all(r["output"] == "" for r in survivors)
        corpus_a = lines(tmp_path / "a" / "corpus.jsonl")
        assert len(corpus_a) == 5 + len(survivors) and corpus_a[0]["output"]  # the seeds' first instances
        assert (
            "[round 1] done" in shown.getvalue()
            and "evolve finished: 5 records, 1 rounds" in shown.getvalue()
        )
        server.clear()
        # a run directory as INPUT (its corpus.jsonl), survivors only, stopped by --max-requests
        second = config(
            tmp_path / "a", tmp_path / "b", server, rounds=2, include_originals=False, max_requests=4
        )
        assert run_evolve(second, console=QUIET) == 0
        assert len([r for r in server.completions() if r.json.get("max_tokens") != 1]) == 4
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["records"] == len(corpus_a) and summary["requests"] == 4
    assert not summary["finished"] and summary["stop_reason"] == "max_requests"
    assert lines(tmp_path / "b" / "corpus.jsonl") == [
        {k: r[k] for k in ("instruction", "input", "output", "meta")}
        for r in lines(tmp_path / "b" / "evolved.jsonl")
    ]


def test_command_line_errors_are_one_line(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "selfinstruct.cli", "evolve", *args], capture_output=True, text=True
        )

    for args, message in (
        ((), "evolve needs an INPUT"),
        ((str(tmp_path / "missing.jsonl"),), "file not found"),
        (("x.jsonl", "--ops", "deepen,shorten"), "unknown operation 'shorten'"),
    ):
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "instructions.jsonl").write_text("")
    inp = corpus(tmp_path / "in.jsonl", plain=2, triggered=False)
    result = cli(str(inp), "--out", str(tmp_path / "other"), "--rounds", "0")
    assert result.returncode == 2 and "not an evolve run" in result.stderr


# ---------------------------------------------------------------- crash safety


def command(inp: Path, out: Path, server: FakeOpenAI) -> list[str]:
    return [
        sys.executable, "-m", "selfinstruct.cli", "evolve", str(inp), "--out", str(out), "--rounds", "3",
        "--model", "fake-model", "--base-url", server.url, "--api-key-env", "", "--concurrency", "4",
        "--max-retries", "2", "--backoff", "0.01",
    ]  # fmt: skip


def complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_text()
    out = (data if data.endswith("\n") else data[: data.rfind("\n") + 1]).splitlines()
    for line in out:
        json.loads(line)  # a torn line in the middle fails here
    return out


def test_sigkill_mid_round_then_resume_loses_and_duplicates_nothing(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", plain=24, triggered=True)
    out = tmp_path / "run"
    rng = random.Random(20261203)
    seen = {"evolved.jsonl": [], "rejected.jsonl": []}
    kills = sessions = 0
    with FakeOpenAI(responder=EvolveResponder(seed=4), latency=0.02) as server:
        while kills < 3:
            before = sum(len(v) for v in seen.values())
            sessions += 1
            proc = subprocess.Popen(
                command(inp, out, server), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            while proc.poll() is None and sum(len(complete_lines(out / n)) for n in seen) == before:
                time.sleep(0.01)  # start-up takes a while: wait for the first outcome of this session
            try:
                proc.wait(timeout=rng.uniform(0.0, 0.6))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                assert proc.returncode == 0, proc.stderr.read()
                break
            finally:
                proc.stderr.close()
            for name in seen:
                now = complete_lines(out / name)
                assert now[: len(seen[name])] == seen[name], f"{name}: a record was lost or rewritten"
                seen[name] = now
            outcomes(out)  # never two outcomes for one (lineage, round), even mid-run
        final = subprocess.run(command(inp, out, server), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert kills >= 1
    for name in seen:
        assert complete_lines(out / name)[: len(seen[name])] == seen[name]
        assert (out / name).read_text().endswith("\n")
    check_lineages(out, 34, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["sessions"] == sessions + 1
    assert summary["kept"] == len(lines(out / "evolved.jsonl"))
    assert summary["corpus_records"] == 34 + summary["kept"] == len(lines(out / "corpus.jsonl"))


def generation_requests(server: FakeOpenAI) -> Counter[str]:
    """The rewrite, judge and answer requests the server got (not a teacher's start-up check), by body."""
    sent = server.completions("/chat/completions")
    return Counter(json.dumps(r.json, sort_keys=True) for r in sent if r.json.get("max_tokens") != 1)


def test_a_batch_running_when_killed_is_polled_again_and_never_paid_twice(tmp_path):
    """`--batch-api`: kill -9 while the judge step's batch runs at the provider; the rerun polls that batch again
    and its answers carry the attempts on, so the run asks exactly what an uninterrupted one asks."""
    inp = corpus(tmp_path / "in.jsonl", plain=8, triggered=False)
    out, log = tmp_path / "run", tmp_path / "run" / "batches.jsonl"
    batch = {"batch_api": True, "batch_poll": 0.02}
    with FakeOpenAI(responder=EvolveResponder(seed=1)) as server:
        assert run_evolve(config(inp, tmp_path / "ref", server, teacher=batch, rounds=2), console=QUIET) == 0
        asked = generation_requests(server)
        server.clear()
        created, server.batch_delay = server.batch_creations, 1.0  # a window to kill in
        args = [
            sys.executable, "-m", "selfinstruct.cli", "evolve", str(inp), "--out", str(out), "--rounds", "2",
            "--model", "fake-model", "--base-url", server.url, "--api-key-env", "", "--batch-api",
            "--batch-poll", "0.02",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        events: list[dict] = []
        while (
            len(events) < 5
        ):  # prepared, submitted, finished (the rewrites), prepared, submitted (the judges)
            assert proc.poll() is None, "the run ended before the kill"
            time.sleep(0.005)
            events = [json.loads(line) for line in complete_lines(log)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert events[4]["event"] == "submitted" and len(lines(log)) == 5 and not lines(out / "evolved.jsonl")
        server.batch_delay = 0.0
        assert run_evolve(config(inp, out, server, teacher=batch, rounds=2), console=QUIET) == 0
        again = generation_requests(server)
    assert again == asked  # every request once: the judges' batch was polled again, not sent again
    assert (out / "evolved.jsonl").read_text() == (tmp_path / "ref" / "evolved.jsonl").read_text()
    assert outcomes(out).keys() == outcomes(tmp_path / "ref").keys()
    labels = Counter((line["label"], line["event"]) for line in lines(log))
    assert set(labels.values()) == {1} and {e for _, e in labels} == {"prepared", "submitted", "finished"}
    assert server.batch_creations - created == sum(e == "submitted" for _, e in labels)


# ---------------------------------------------------------------- stats


def test_stats_understands_an_evolve_run(evolved_run, tmp_path):
    from selfinstruct.report import StatsConfig, stats_report

    stats, out = stats_report(
        StatsConfig(path=str(evolved_run), out=str(tmp_path / "report"), parser="heuristic")
    )
    evo = stats["evolution"]
    assert evo["available"] and evo["rounds"]["1"]["attempts"] == 18
    survivors = lines(evolved_run / "evolved.jsonl")
    assert sum(r["survived"] for r in evo["rounds"].values()) == len(survivors)
    assert sum(o["survived"] for o in evo["by_op"].values()) == len(survivors)
    for op, o in evo["by_op"].items():
        assert o["survival_rate"] == pytest.approx(o["survived"] / o["attempts"]), op
    depths = {d["depth"]: d for d in evo["by_depth"]}
    assert depths[0]["records"] == 18 and sum(d["records"] for d in evo["by_depth"]) == 18 + len(survivors)
    assert depths[3]["instruction_words"]["mean"] > depths[0]["instruction_words"]["mean"]  # rewrites grow
    assert all(d["distinct_verbs"] >= 1 and d["answer_words"]["mean"] > 0 for d in evo["by_depth"])
    assert stats["plots"]["evolution"] == "evolution.png" and (out / "evolution.png").stat().st_size > 0
    assert "Evolution by round, operation and depth" in (out / "report.html").read_text()


# ---------------------------------------------------------------- the real in-process vLLM engine


@pytest.mark.vllm
def test_evolve_on_vllm(vllm_teacher, tiny_model_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o, _ in SMALL_SEEDS[:6]
        )
    )
    out = tmp_path / "run"
    cfg = EvolveConfig(
        input=str(inp),
        out=str(out),
        rounds=2,
        evolve_max_tokens=160,
        answer_max_tokens=48,
        answer_temperature=1.0,
        schema_max_chars=120,
        filters=FilterConfig(
            check_length=False,
            check_punctuation=False,
            check_non_ascii=False,
            blacklist="none",
            threshold=1.0,
        ),
        teacher=tiny_vllm_config(tiny_model_dir),
    )
    requests_before = vllm_teacher.stats.requests
    assert run_evolve(cfg, teacher=vllm_teacher, console=QUIET) == 0
    check_lineages(out, 6, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["requests"] == vllm_teacher.stats.requests - requests_before
    rejected = lines(out / "rejected.jsonl")
    # structured output: every rewrite and every verdict was valid JSON
    assert not [r for r in rejected if r["reason"] == "unparseable"]
    reached = {r["meta"]["step"] for r in rejected} | ({"kept"} if lines(out / "evolved.jsonl") else set())
    assert reached & {"judge", "answer", "kept"}, reached
    assert summary["corpus_records"] == len(lines(out / "corpus.jsonl")) == 6 + summary["kept"]


def test_sigterm_stops_evolve_gently_with_exit_143(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", triggered=False)
    responder = SignalOnFirstRequest(EvolveResponder(seed=1), signal.SIGTERM)
    with FakeOpenAI(responder=responder) as server:
        assert run_evolve(config(inp, tmp_path / "run", server, rounds=2), console=QUIET) == 143
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
