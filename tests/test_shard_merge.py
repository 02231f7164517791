"""`--shard i/N` and `selfinstruct merge`: 4 shards merged equal one process for the per-record stages, and
bootstrap shards grown from disjoint seed subsets merge into a set that passes the exact novelty check."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from selfinstruct.cli import run as cli_run
from selfinstruct.errors import UserError
from selfinstruct.filters import FilterConfig, novelty_index
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.shard import Shard
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

N = 4
PER_RECORD = ["classify", "instances", "finetune"]


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def config(seeds: Path, out: Path, server: FakeOpenAI, **settings) -> GenerateConfig:
    teacher = TeacherConfig(
        model="fake-model", base_url=[server.url], api_key_env="", concurrency=4, max_retries=1
    )
    return GenerateConfig(
        seeds=str(seeds),
        out=str(out),
        num_instructions=settings.pop("num_instructions", 40),
        teacher=teacher,
        **settings,
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_shard_spec_and_stable_partition() -> None:
    shard = Shard.parse("1/4")
    assert shard is not None and str(shard) == "1/4" and Shard.parse("0/1") is None
    ids = [f"gen_{i:06d}" for i in range(400)]
    parts = [Shard(i, N).select(ids, key=str) for i in range(N)]
    assert sorted(i for part in parts for i in part) == ids  # a partition: every id in exactly one shard
    assert all(60 < len(p) < 140 for p in parts)  # roughly even
    assert Shard(0, N).of("gen_000007") == Shard(3, N).of("gen_000007")  # stable: the id alone decides
    for bad in ("4/4", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


def test_merge_of_4_shards_equals_one_process(seeds: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    with FakeOpenAI(PipelineResponder(seed=7)) as server:
        run_generate(config(seeds, base, server, stages=["bootstrap"]))
        for name in ["single", *(f"shard{i}" for i in range(N))]:
            shutil.copytree(base, tmp_path / name)
        # written labels: logprob scoring would add its 3 calibration requests once per shard to the usage
        per_record = {"stages": PER_RECORD, "classify_scoring": "label"}
        run_generate(config(seeds, tmp_path / "single", server, **per_record))
        for i in range(N):
            run_generate(config(seeds, tmp_path / f"shard{i}", server, shard=f"{i}/{N}", **per_record))
    sizes = [len(lines(tmp_path / f"shard{i}" / "classification.jsonl")) for i in range(N)]
    assert sum(sizes) == 40 and max(sizes) < 40  # each shard answered only its share
    argv = ["merge", *(str(tmp_path / f"shard{i}") for i in range(N)), "--out", str(tmp_path / "merged")]
    assert cli_run(argv) == 0
    merged, single = tmp_path / "merged", tmp_path / "single"
    for name in ("instructions.jsonl", "corpus.jsonl"):
        assert lines(merged / name) == lines(single / name), name  # same records, same ids, same order
    for name in ("classification.jsonl", "instances.jsonl"):  # written as answers arrive: compare by id
        assert sorted(lines(merged / name), key=lambda r: r["id"]) == sorted(
            lines(single / name), key=lambda r: r["id"]
        ), name
    assert sorted(map(json.dumps, lines(merged / "rejected.jsonl"))) == sorted(
        map(json.dumps, lines(single / "rejected.jsonl"))
    )
    got, want = (json.loads((d / "summary.json").read_text()) for d in (merged, single))
    assert got["finished"] and got["merge"]["duplicate_ids"] == 3 * 40  # every shard held the base's 40
    for key in ("kept", "corpus_records", "requests", "prompt_tokens", "completion_tokens"):
        assert got[key] == want[key], key  # the base run's usage counted once, the shards' summed
    assert got["stages"]["classify"]["requests"] == want["stages"]["classify"]["requests"] == 40
    with pytest.raises(UserError, match="not empty"):
        cli_run(argv)


def test_bootstrap_shards_grow_from_disjoint_seeds_and_merge_is_novel(seeds: Path, tmp_path: Path) -> None:
    with FakeOpenAI(PipelineResponder(seed=11)) as server:
        for i in range(N):
            cfg = config(seeds, tmp_path / f"s{i}", server, num_instructions=25, shard=f"{i}/{N}")
            run_generate(cfg)
        with pytest.raises(UserError, match="holds shard 0/4"):
            run_generate(config(seeds, tmp_path / "s0", server, num_instructions=25, shard=f"1/{N}"))
    shown: list[set[str]] = []
    union: list[str] = []
    for i in range(N):
        records = lines(tmp_path / f"s{i}" / "instructions.jsonl")
        assert len(records) == 25 and all(r["id"].startswith(f"gen_s{i}_") for r in records)
        shown.append({s for r in records for s in r["meta"]["seed_ids"]})
        union += [r["instruction"] for r in records]
        # the shard's classify/instances answered all of its own records (they carry their shard)
        assert len(lines(tmp_path / f"s{i}" / "instances.jsonl")) == 25
    for i in range(N):
        for j in range(i + 1, N):
            assert not shown[i] & shown[j]  # disjoint seed subsets
    summary = json.loads(
        (tmp_path / "m" / "summary.json").read_text()
        if cli_run(["merge", *(str(tmp_path / f"s{i}") for i in range(N)), "--out", str(tmp_path / "m")]) == 0
        else "{}"
    )
    merged = [r["instruction"] for r in lines(tmp_path / "m" / "instructions.jsonl")]
    dropped = summary["merge"]["dropped_too_similar"]
    assert dropped > 0  # shards do write near-duplicates of each other: the re-check is needed
    assert len(merged) == len(union) - dropped
    # the exact check: every merged instruction is novel against all the others
    assert all(v.keep for v in novelty_index(FilterConfig()).query(merged))
    rejected = [r for r in lines(tmp_path / "m" / "rejected.jsonl") if r["stage"] == "merge"]
    assert len(rejected) == dropped and all(r["reason"] == "too_similar" for r in rejected)
    merged_ids = {r["id"] for r in lines(tmp_path / "m" / "instructions.jsonl")}
    assert {r["id"] for r in lines(tmp_path / "m" / "instances.jsonl")} == merged_ids
    assert {r["meta"]["task_id"] for r in lines(tmp_path / "m" / "corpus.jsonl")} <= merged_ids


def test_select_scoring_shards_merge_into_the_single_process_selection(tmp_path: Path) -> None:
    from selfinstruct.select import SelectConfig, select
    from selfinstruct.testing.raters import RatingResponder

    responder, rng = PipelineResponder(7), random.Random(3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(responder._task(rng)) + "\n" for _ in range(40)))
    with FakeOpenAI(responder=RatingResponder()) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", max_retries=1)

        def cfg(out: str, **kw) -> SelectConfig:
            return SelectConfig(
                input=str(corpus), out=str(tmp_path / out), n=12, score=["judge"], teacher=teacher, **kw
            )

        single = select(cfg("single"))
        for i in range(N):
            report = select(cfg(f"part{i}", shard=f"{i}/{N}"))
            assert report["complete"] and report["scored_records"] < 40
        assert (
            cli_run(["merge", *(str(tmp_path / f"part{i}") for i in range(N)), "--out", str(tmp_path / "m")])
            == 0
        )
        server.clear()
        merged = select(cfg("m"))
        assert not server.completions()  # every score came from the shards
    assert lines(tmp_path / "m" / "selected.jsonl") == lines(tmp_path / "single" / "selected.jsonl")
    assert merged["teacher_usage"]["requests"] == single["teacher_usage"]["requests"] == 40


def test_evolve_shards_merge_novel_and_complete(tmp_path: Path) -> None:
    from rich.console import Console

    from selfinstruct.evolve import EvolveConfig, run_evolve
    from selfinstruct.testing.responders import EvolveResponder

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"instruction": t["instruction"], "input": "", "output": t["instances"][0]["output"]})
            + "\n"
            for t in small_seed_tasks()[:12]
        )
    )
    quiet = Console(stderr=True, quiet=True)
    with FakeOpenAI(responder=EvolveResponder(seed=2)) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", concurrency=4)
        for i in range(N):
            cfg = EvolveConfig(
                input=str(inp), out=str(tmp_path / f"e{i}"), teacher=teacher, rounds=2, shard=f"{i}/{N}"
            )
            assert run_evolve(cfg, console=quiet) == 0
    roots = [
        {r["meta"]["evol"]["root_id"] for r in lines(tmp_path / f"e{i}" / "evolved.jsonl")} for i in range(N)
    ]
    assert all(not (roots[i] & roots[j]) for i in range(N) for j in range(i + 1, N))  # disjoint lineages
    assert cli_run(["merge", *(str(tmp_path / f"e{i}") for i in range(N)), "--out", str(tmp_path / "m")]) == 0
    survivors = lines(tmp_path / "m" / "evolved.jsonl")
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    total = sum(len(lines(tmp_path / f"e{i}" / "evolved.jsonl")) for i in range(N))
    assert len(survivors) == total - summary["merge"]["dropped_too_similar"] > 0
    # survivors of different lineages never exceed the threshold against each other
    by_root: dict[str, list[str]] = {}
    for rec in survivors:
        by_root.setdefault(rec["meta"]["evol"]["root_id"], []).append(rec["instruction"])
    index = novelty_index(FilterConfig())
    for texts in by_root.values():
        assert all(v.keep for v in index.query(texts, add_kept=False))
        index.add(texts)
    corpus = lines(tmp_path / "m" / "corpus.jsonl")
    assert len(corpus) == 12 + len(survivors)  # the input records once, then every survivor
