"""`selfinstruct select`: scorers (length, IFD, judge, DEITA), combination, the diversity walk, determinism,
the score cache (resume, budgets) and the stats plot."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from selfinstruct.cli import run
from selfinstruct.errors import UserError
from selfinstruct.filters.rouge import NoveltyIndex
from selfinstruct.select import SelectConfig, combine, parse_rating, rank_order, record_id, select
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.raters import RatingResponder, deita, rating
from selfinstruct.testing.responders import PipelineResponder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 Alpaca records from the fake teacher's grammar: many share a template, outputs of 1-3 sentences."""
    rng = random.Random(7)
    responder = PipelineResponder(7)
    rows = [responder._task(rng) for _ in range(120)]
    for k, r in enumerate(rows):
        r["meta"] = {"k": k}
    path = tmp_path_factory.mktemp("select") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def teacher(server: FakeOpenAI, **kw) -> TeacherConfig:
    return TeacherConfig(
        model="fake-model", base_url=[server.url], api_key_env="", concurrency=4, backoff=0.01, **kw
    )


def test_length_is_the_top_k_by_output_tokens(corpus, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = rows(corpus)
    lengths = [len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in data]
    report = select(
        SelectConfig(input=str(corpus), out=str(tmp_path / "o"), n=15, scorer_model=str(tiny_model_dir))
    )
    chosen = rows(tmp_path / "o" / "selected.jsonl")
    assert report["selected"] == 15 and len(chosen) == 15
    got = sorted(lengths[r["meta"]["k"]] for r in chosen)
    assert got == sorted(lengths, reverse=True)[:15][::-1]
    assert [r["meta"]["select"]["rank"] for r in chosen] == list(range(1, 16))
    scores = [r["meta"]["select"]["score"] for r in chosen]
    assert scores == sorted(scores, reverse=True)
    # records unchanged apart from meta.select
    for r in chosen:
        original = data[r["meta"]["k"]]
        assert {**r, "meta": {"k": r["meta"]["k"]}} == original
    # words when no scorer model is given
    select(SelectConfig(input=str(corpus), out=str(tmp_path / "w"), n=10))
    words = sorted((len(r["output"].split()) for r in data), reverse=True)[:10]
    assert sorted(
        r["meta"]["select"]["scores"]["length"] for r in rows(tmp_path / "w" / "selected.jsonl")
    ) == sorted(words)


def test_ties_follow_the_seed_deterministically(corpus, tmp_path):
    def pick(seed: int, out: str) -> list[int]:
        select(SelectConfig(input=str(corpus), out=str(tmp_path / out), n=40, seed=seed))
        return [r["meta"]["k"] for r in rows(tmp_path / out / "selected.jsonl")]

    a, b, c = pick(1, "a"), pick(1, "b"), pick(2, "c")
    assert a == b
    assert a != c  # 120 outputs of a few sentence lengths: many ties at the cut
    assert sorted(rank_order([1.0, 3.0, 3.0, 2.0], 0)[:2]) == [1, 2]


def test_no_selected_pair_exceeds_max_similarity(corpus, tmp_path):
    select(
        SelectConfig(input=str(corpus), out=str(tmp_path / "r"), n=30, diversity="rouge", max_similarity=0.5)
    )
    chosen = rows(tmp_path / "r" / "selected.jsonl")
    report = json.loads((tmp_path / "r" / "select_report.json").read_text())
    assert len(chosen) == 30 and report["skipped_too_similar"] > 0
    for x, y in itertools.combinations([r["instruction"] for r in chosen], 2):
        (result,) = NoveltyIndex.from_texts([x], top_k=0).query([y], add_kept=False)
        assert result.max_f <= 0.5
    unconstrained = rows(corpus)

    from selfinstruct.embed import HashedEncoder, cosine

    select(
        SelectConfig(
            input=str(corpus),
            out=str(tmp_path / "e"),
            n=25,
            diversity="embed",
            encoder="hashed",
            max_similarity=0.6,
        )
    )
    chosen = rows(tmp_path / "e" / "selected.jsonl")
    texts = [f"{r['instruction']}\n{r['input']}" for r in chosen]
    enc = HashedEncoder()
    enc.fit([f"{r['instruction']}\n{r['input']}" for r in unconstrained])
    sims = cosine(enc.encode(texts), enc.encode(texts))
    np.fill_diagonal(sims, 0.0)
    assert len(chosen) == 25 and sims.max() < 0.6


def test_ifd_excludes_at_or_above_one_and_matches_the_definition(corpus, tiny_model_dir, tmp_path):
    from selfinstruct.evaluate import response_losses
    from selfinstruct.records import CorpusRecord
    from selfinstruct.train import to_examples

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows(corpus)[:24]))
    cfg = SelectConfig(
        input=str(small), out=str(tmp_path / "o"), n=24, score=["ifd"], scorer_model=str(tiny_model_dir)
    )
    report = select(cfg)
    scores = [x for x in rows(tmp_path / "o" / "scores.jsonl") if x["scorer"] == "ifd"]
    assert len(scores) == 24
    high = sum(1 for x in scores if x["score"] >= 1)
    assert 0 < high < 24  # a random tiny model: some of each
    assert report["excluded"] == {"ifd_too_high": high} and report["selected"] == 24 - high
    chosen = rows(tmp_path / "o" / "selected.jsonl")
    values = [r["meta"]["select"]["scores"]["ifd"] for r in chosen]
    assert all(v < 1 for v in values) and values == sorted(values, reverse=True)
    # IFD = ppl(output | prompt) / ppl(output), checked against evaluate's per-example losses
    record = CorpusRecord.from_dict(rows(small)[0])
    cond, direct = response_losses(
        str(tiny_model_dir),
        [to_examples([record], "chat")[0], {"prompt": "", "completion": record.output}],
        batch_size=1,
    )
    line = next(x for x in scores if x["id"] == record_id(record))
    assert line["ppl_conditioned"] == pytest.approx(math.exp(cond.nll / cond.tokens), rel=1e-4)
    assert line["ppl_direct"] == pytest.approx(math.exp(direct.nll / direct.tokens), rel=1e-4)
    assert line["score"] == pytest.approx(line["ppl_conditioned"] / line["ppl_direct"], rel=1e-6)
    # rescoring is skipped: a rerun adds no lines
    select(cfg.model_copy(update={"n": 5}))
    assert len(rows(tmp_path / "o" / "scores.jsonl")) == len(scores)
    # batching (right padding, sequences sorted by length) does not change a score
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    select(cfg.model_copy(update={"out": str(tmp_path / "b1"), "scorer_batch_size": 1}), console=console)
    assert "ifd" in screen.getvalue() and "24/24" in screen.getvalue()  # the progress bar
    one_by_one = {x["id"]: x["score"] for x in rows(tmp_path / "b1" / "scores.jsonl")}
    assert [x["score"] for x in scores] == pytest.approx([one_by_one[x["id"]] for x in scores], rel=1e-4)


def test_judge_and_deita_through_the_teacher_with_resume_and_budget(corpus, tmp_path):
    data = rows(corpus)[:30]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "o"
    with FakeOpenAI(responder=RatingResponder()) as server:
        cfg = SelectConfig(
            input=str(small), out=str(out), n=10, score=["judge"], max_requests=12, teacher=teacher(server)
        )
        report = select(cfg)
        assert report["stop_reason"] == "max_requests" and report["complete"] is False
        assert report["excluded"]["unscored"] == 30 - 12  # the cap is exact
        server.clear()
        report = select(cfg.model_copy(update={"max_requests": None}))
        asked = server.completions()
        assert len(asked) == 1 + 18  # the start-up probe + only the records without a score
        assert asked[-1].json["response_format"]["type"] == "json_schema"
        assert len({r.json["seed"] for r in asked[1:]}) == 18  # a seed per record, from --seed
        assert report["complete"] and report["selected"] == 10
        chosen = rows(out / "selected.jsonl")
        ratings = sorted((rating(r["output"]) for r in data), reverse=True)
        assert [r["meta"]["select"]["scores"]["judge"] for r in chosen] == ratings[:10]
        state = json.loads((out / "select_state.json").read_text())
        assert state["usage"]["requests"] == 12 + 18 == report["teacher_usage"]["requests"]
        assert report["teacher_usage"]["prompt_tokens"] > 0

        # another N, weights and combination over cached scores: not a single request (not even the probe)
        server.clear()
        again = select(
            cfg.model_copy(update={"max_requests": None, "n": 5, "weights": [2.0], "combine": "sum"})
        )
        assert server.requests == [] and again["complete"] and again["selected"] == 5
        assert again["teacher_usage"]["requests"] == 12 + 18

        # DEITA = complexity x quality, and a product with length (cached: no new length scoring)
        report = select(cfg.model_copy(update={"score": ["deita", "length"], "weights": [1.0, 0.5]}))
        chosen = rows(out / "selected.jsonl")
        for r in chosen:
            c, q = deita(r["output"])
            s = r["meta"]["select"]["scores"]
            assert s["deita"] == c * q
            assert r["meta"]["select"]["score"] == pytest.approx(c * q * math.sqrt(s["length"]))
        combined = [r["meta"]["select"]["score"] for r in chosen]
        assert combined == sorted(combined, reverse=True)


def test_teacher_cost_and_cost_budget(corpus, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows(corpus)[:20]))
    with FakeOpenAI(responder=RatingResponder()) as server:
        priced = teacher(server, price_input=1000.0, price_output=2000.0)
        cfg = SelectConfig(input=str(small), out=str(tmp_path / "o"), n=5, score=["deita"], teacher=priced)
        report = select(cfg.model_copy(update={"max_cost": 0.5}))
    usage = report["teacher_usage"]
    expected = (usage["prompt_tokens"] * 1000.0 + usage["completion_tokens"] * 2000.0) / 1e6
    assert usage["cost"] == pytest.approx(expected) and usage["cost"] >= 0.5
    assert report["stop_reason"] == "max_cost" and 0 < usage["requests"] < 20
    assert json.loads((tmp_path / "o" / "select_report.json").read_text())["teacher_usage"] == usage


def test_combine_and_parse_rating():
    scores = {"a": [1.0, 4.0, 2.0], "b": [10.0, 0.0, 5.0]}
    assert combine(scores, {"a": 1, "b": 1}, "product") == [10.0, 0.0, 10.0]
    assert combine(scores, {"a": 2, "b": 1}, "sum") == pytest.approx([1.0, 2.0, 2 / 3 + 0.5])
    assert parse_rating("judge", '{"rating": 4}') == {"rating": 4.0}
    assert parse_rating("judge", "I'd say 3 out of 5") == {"rating": 3.0}
    assert parse_rating("judge", "nine") is None and parse_rating("judge", '{"rating": 9}') is None
    assert parse_rating("deita", "Complexity 2, quality 5.") == {"complexity": 2.0, "quality": 5.0}


def test_bad_settings_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="one weight per scorer"):
        run(["select", str(corpus), "--score", "length,judge", "--weights", "1"])
    with pytest.raises(UserError, match="--scorer-model"):
        select(SelectConfig(input=str(corpus), out=str(tmp_path / "o"), score=["ifd"]))
    with pytest.raises(UserError, match=r"--scorer-model \./missing: no such directory"):
        select(
            SelectConfig(input=str(corpus), out=str(tmp_path / "o"), score=["ifd"], scorer_model="./missing")
        )


def test_stats_plots_score_distributions_of_selected_vs_other(corpus, tmp_path):
    from selfinstruct.report import StatsConfig, stats_report

    select(SelectConfig(input=str(corpus), out=str(tmp_path / "o"), n=20))
    stats, out = stats_report(StatsConfig(path=str(tmp_path / "o"), out=str(tmp_path / "rep")))
    sel = stats["selection"]
    assert sel["available"] and sel["selected"] == 20
    assert len(sel["scorers"]["length"]["selected"]) == 20 and len(sel["scorers"]["length"]["other"]) == 100
    assert min(sel["scorers"]["length"]["selected"]) >= max(sel["scorers"]["length"]["other"])
    assert (out / "selection.png").is_file() and "Selection" in (out / "report.html").read_text()
