"""`selfinstruct stats`: numbers in stats.json for a hand-made run directory, the report files, and the
root-verb heuristic."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfinstruct.filters import TOO_SIMILAR
from selfinstruct.report import StatsConfig, stats_report, verb_object
from selfinstruct.rundir import REJECTED, RejectedRecord

REPO = Path(__file__).resolve().parents[1]

SEEDS = [
    {"id": "s0", "name": "s0", "instruction": "Write a poem about the sea.", "instances": [{"input": "", "output": "Waves."}]},
    {"id": "s1", "name": "s1", "instruction": "Classify the sentiment of the review.", "instances": [{"input": "Great!", "output": "Positive"}], "is_classification": True},
]  # fmt: skip

# (instruction, is_classification, [(input, output)])
KEPT = [
    ("Write a poem about the sea.", False, [("", "one two three"), ("", "one two three four five")]),
    ("Classify the sentiment of the tweet.", True, [("I love it", "Positive")]),
    ("Please summarize the following article in two sentences.", False, [("a b c d e f", "x y")]),
    ("Given a list of numbers, find the largest number in it.", False, [("1 5 3", "5")]),
    ("Tell me a joke about cats.", False, [("", "Why did the cat sit on the computer")]),
]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    _jsonl(seeds, SEEDS)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'[generate]\nseeds = "{seeds}"\n', encoding="utf-8")
    instructions, corpus = [], []
    for n, (text, cls, instances) in enumerate(KEPT):
        pairs = [{"input": i, "output": o} for i, o in instances]
        instructions.append(
            {"id": f"gen_{n}", "instruction": text, "is_classification": cls, "instances": pairs}
        )
        for i, o in instances:
            corpus.append(
                {
                    "instruction": text,
                    "input": i,
                    "output": o,
                    "meta": {"task_id": f"gen_{n}", "is_classification": cls},
                }
            )
    _jsonl(run / "instructions.jsonl", instructions)
    _jsonl(run / "corpus.jsonl", corpus)
    rejected = (
        [(TOO_SIMILAR, "bootstrap")] * 3 + [("too_short", "bootstrap")] * 2 + [("unparseable", "instances")]
    )
    records = [
        RejectedRecord(instruction="x", reason=r, stage=s, nearest=None, round=0, meta={})
        for r, s in rejected
    ]
    _jsonl(run / REJECTED, records)
    summary = {
        "pipeline": "self-instruct", "teacher_model": "tiny", "target": 5, "kept": 5, "candidates": 10,
        "parse_failures": 2, "requests": 4, "failed_requests": 0, "retries": 1, "prompt_tokens": 1000,
        "completion_tokens": 500, "cost": 0.25, "elapsed_s": 12.0, "finished": True,
        "rejected_by_reason": {"too_similar": 3, "too_short": 2, "unparseable": 1},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


def test_stats_of_a_run_directory(run_dir: Path):
    stats, out = stats_report(StatsConfig(path=str(run_dir)))
    assert out == run_dir.resolve() / "report"
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))

    c = stats["counts"]
    assert (c["instructions"], c["instances"], c["classification_instructions"]) == (5, 6, 1)
    assert c["non_classification_instructions"] == 4
    assert c["instances_with_input"] == 3 and c["share_with_input"] == 0.5

    lengths = stats["lengths"]
    assert lengths["instruction"]["count"] == 5 and lengths["instruction"]["max"] == 11
    assert lengths["input"]["count"] == 3 and lengths["input"]["mean"] == pytest.approx((3 + 6 + 3) / 3)
    assert lengths["output"]["median"] == 2.5  # outputs: 3, 5, 1, 2, 1, 8 words
    assert sum(lengths["output"]["histogram"]["counts"]) == 6

    novelty = stats["rouge_to_seeds"]
    assert novelty["available"] and novelty["seed_instructions"] == 2 and novelty["scored_instructions"] == 5
    # Exact nearest-seed F: identical text -> 1.0; "classify the sentiment of the tweet" vs "... review" -> 5/6.
    assert novelty["histogram"]["counts"][-1] == 1
    assert novelty["histogram"]["counts"][int(5 / 6 * 20)] == 1
    assert novelty["share_above_threshold"] == pytest.approx(2 / 5) and novelty["threshold"] == 0.7

    verbs = {v["verb"]: v for v in stats["verbs"]["top"]}
    assert stats["verbs"]["parser"] in ("heuristic", "spacy:en_core_web_sm")
    if stats["verbs"]["parser"] == "heuristic":
        assert set(verbs) == {"write", "classify", "summarize", "find", "tell"}
        assert verbs["write"]["objects"] == [{"object": "poem", "count": 1}]
        assert verbs["tell"]["objects"][0]["object"] == "joke"

    rejections = stats["rejections"]
    assert rejections["total"] == 6
    assert rejections["by_reason"] == {"too_similar": 3, "too_short": 2, "unparseable": 1}
    assert rejections["by_stage"] == {"bootstrap": 5, "instances": 1}

    g = stats["generation"]
    assert g["parse_failure_rate"] == pytest.approx(2 / 12)
    assert g["keep_rate"] == pytest.approx(0.5)
    assert g["total_tokens"] == 1500 and g["tokens_per_kept"] == 300
    assert g["cost_per_1k_kept"] == pytest.approx(50.0)


def test_report_files_are_self_contained(run_dir: Path):
    stats, out = stats_report(StatsConfig(path=str(run_dir), out=str(run_dir / "r")))
    for name in ("lengths", "rouge_to_seeds", "verbs", "rejections"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stats["plots"][name] == png.name
    page = (out / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    for text in ("too_similar", "Tell me a joke about cats.", "16.7%", "$0.2500"):
        assert text in page


def test_bare_corpus_says_what_is_not_available(tmp_path: Path):
    corpus = tmp_path / "data.json"
    corpus.write_text(
        json.dumps([{"instruction": "Write a haiku about rain.", "input": "", "output": "Drops."}])
    )
    stats, out = stats_report(StatsConfig(path=str(corpus)))
    assert out == tmp_path / "data_report"
    assert stats["counts"]["instances"] == 1
    assert not stats["rouge_to_seeds"]["available"]
    assert not stats["rejections"]["available"] and not stats["generation"]["available"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("Not available") == 3
    assert not (out / "rejections.png").exists()


@pytest.mark.parametrize(
    ("instruction", "expected"),
    [
        ("Write a short story about a dragon.", ("write", "story")),
        ("Can you generate a list of ten ideas for dinner?", ("generate", "list")),
        ("Given a sentence, classify it as positive or negative.", ("classify", None)),
        ("Come up with a name for a bakery.", ("come", "name")),
        ("Explain why the sky is blue.", ("explain", None)),
        ("Rewrite this paragraph in the passive voice.", ("rewrite", "paragraph")),
        ("What is the capital of France?", (None, None)),
    ],
)
def test_verb_object_heuristic(instruction: str, expected: tuple):
    assert verb_object(instruction) == expected


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfinstruct.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_stats_and_bad_inputs(run_dir: Path, tmp_path: Path):
    ok = _cli("stats", str(run_dir))
    assert ok.returncode == 0, ok.stderr
    assert "5 instructions (1 classification), 6 instances, 50.0% with input" in ok.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args in (
        ["stats", str(tmp_path / "missing")],
        ["stats", str(empty)],
        ["stats"],
        ["stats", str(tmp_path)],
    ):
        bad = _cli(*args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")
def test_report_renders_in_headless_chromium(run_dir: Path):
    _, out = stats_report(StatsConfig(path=str(run_dir)))
    script = REPO / "benchmarks" / "check_report_render.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out / "report.html")], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert (out / "report.png").stat().st_size > 20_000
