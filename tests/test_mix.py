"""`selfinstruct mix`: weighted allocation, per-task caps, provenance, determinism and errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfinstruct import cli
from selfinstruct.corpus import load_corpus_any
from selfinstruct.errors import UserError
from selfinstruct.mix import MixConfig, Source, allocate, mix, mix_records, parse_source
from selfinstruct.records import CorpusRecord


def _corpus(path: Path, tasks: dict[str, int]) -> Path:
    rows = [
        {"instruction": f"{task} #{i}", "output": "x", "meta": {"task": task}}
        for task, n in tasks.items()
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "total, weights, available, expected",
    [
        (10, [0.4, 0.6], [100, 100], [4, 6]),
        (10, [0.4, 0.6], [2, 100], [2, 8]),  # a short source gives all it has, the rest goes elsewhere
        (7, [1, 1, 1], [10, 10, 10], [3, 2, 2]),  # largest remainder, ties by order
        (30, [1, 1, 1], [5, 10, 100], [5, 10, 15]),
        (0, [1, 2], [5, 5], [0, 0]),
    ],
)
def test_allocate_known_cases(total, weights, available, expected):
    assert allocate(total, weights, available) == expected


@given(
    st.lists(st.tuples(st.floats(0.01, 10), st.integers(0, 50)), min_size=1, max_size=6),
    st.integers(0, 300),
)
def test_allocate_never_exceeds_availability_and_fills_the_total(sources, total):
    weights, available = [w for w, _ in sources], [n for _, n in sources]
    counts = allocate(total, weights, available)
    assert all(0 <= c <= n for c, n in zip(counts, available, strict=True))
    assert sum(counts) == min(total, sum(available))


@given(
    st.lists(
        st.dictionaries(st.sampled_from("abcde"), st.integers(1, 30), min_size=1), min_size=1, max_size=4
    ),
    st.integers(1, 25),
    st.booleans(),
    st.integers(0, 3),
)
def test_mixture_never_exceeds_the_cap_nor_repeats_a_record(files, cap, weighted, seed):
    sources = [
        Source(
            f"f{n}.jsonl",
            float(n + 1) if weighted else None,
            [CorpusRecord(f"{n}/{t}/{i}", "", "x", {"task": t}) for t, k in tasks.items() for i in range(k)],
        )
        for n, tasks in enumerate(files)
    ]
    mixture, rows = mix_records(sources, total=None, cap_per_task=cap, seed=seed)
    assert max(Counter(r.meta["task"] for r in mixture).values(), default=0) <= cap
    assert len({r.instruction for r in mixture}) == len(mixture) == sum(row["taken"] for row in rows)
    assert all(r.instruction.startswith(r.meta["source"][1:].removesuffix(".jsonl") + "/") for r in mixture)
    again, _ = mix_records(sources, total=None, cap_per_task=cap, seed=seed)
    assert again == mixture
    available = sum(row["after_cap"] for row in rows)
    for total in sorted({1, available // 2, available} - {0}):
        mixture, _ = mix_records(sources, total=total, cap_per_task=cap, seed=seed)
        assert len(mixture) == total
        assert max(Counter(r.meta["task"] for r in mixture).values()) <= cap


def test_parse_source():
    assert parse_source("a.jsonl:0.4") == ("a.jsonl", 0.4)
    assert parse_source("a.jsonl") == ("a.jsonl", None)
    assert parse_source("dir:x/a.jsonl") == ("dir:x/a.jsonl", None)
    with pytest.raises(UserError, match="positive"):
        parse_source("a.jsonl:0")


def test_weights_total_caps_and_provenance(tmp_path: Path):
    a = _corpus(tmp_path / "a.jsonl", {"big": 200, "small": 5})
    b = _corpus(tmp_path / "b.jsonl", {"other": 100, "more": 100})
    out = tmp_path / "mix.jsonl"
    summary = mix(
        MixConfig(sources=[f"{a}:0.25", f"{b}:0.75"], total=80, cap_per_task=40, out=str(out), seed=1)
    )
    records = load_corpus_any(out)
    assert summary["records"] == len(records) == 80
    by_source = Counter(r.meta["source"] for r in records)
    assert by_source == {str(a): 20, str(b): 60}
    by_task = Counter(r.meta["task"] for r in records)
    assert max(by_task.values()) <= 40
    assert [s["after_cap"] for s in summary["sources"]] == [45, 80]
    assert len({r.instruction for r in records}) == 80  # no record repeated


def test_without_total_keeps_the_largest_exact_mixture(tmp_path: Path):
    a = _corpus(tmp_path / "a.jsonl", {"t1": 30})
    b = _corpus(tmp_path / "b.jsonl", {"t2": 30})
    summary = mix(MixConfig(sources=[f"{a}:1", f"{b}:3"], out=str(tmp_path / "m.jsonl")))
    assert [s["taken"] for s in summary["sources"]] == [10, 30]
    # no weights: examples-proportional with the cap (every task up to 12)
    summary = mix(MixConfig(sources=[str(a), str(b)], cap_per_task=12, out=str(tmp_path / "n.jsonl")))
    assert [s["taken"] for s in summary["sources"]] == [12, 12]


def test_cap_counts_a_task_across_sources(tmp_path: Path):
    a = _corpus(tmp_path / "a.jsonl", {"shared": 20})
    b = _corpus(tmp_path / "b.jsonl", {"shared": 20, "own": 3})
    mix(MixConfig(sources=[str(a), str(b)], cap_per_task=10, out=str(tmp_path / "m.jsonl")))
    counts = Counter(r.meta["task"] for r in load_corpus_any(tmp_path / "m.jsonl"))
    assert counts == {"shared": 10, "own": 3}


def test_cli_is_byte_identical_under_a_seed(tmp_path: Path):
    a = _corpus(tmp_path / "a.jsonl", {"t1": 50, "t2": 50})
    b = _corpus(tmp_path / "b.jsonl", {"t3": 50})
    for name, seed in (("x", "3"), ("y", "3"), ("z", "4")):
        args = ["mix", f"{a}:0.4", f"{b}:0.6", "--total", "60", "--cap-per-task", "30", "--seed", seed]
        assert cli.run([*args, "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    x, y, z = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "xyz")
    assert x == y != z


def test_errors(tmp_path: Path):
    a = _corpus(tmp_path / "a.jsonl", {"t": 5})
    b = _corpus(tmp_path / "b.jsonl", {"u": 5})
    out = str(tmp_path / "m.jsonl")
    with pytest.raises(UserError, match="to every source"):
        mix(MixConfig(sources=[f"{a}:1", str(b)], out=out))
    with pytest.raises(UserError, match="hold only 10 records"):
        mix(MixConfig(sources=[str(a), str(b)], total=11, out=out))
    with pytest.raises(UserError, match="hold only 4 records after --cap-per-task"):
        mix(MixConfig(sources=[str(a), str(b)], total=5, cap_per_task=2, out=out))
    with pytest.raises(UserError, match="given twice"):
        mix(MixConfig(sources=[str(a), str(a)], out=out))
    with pytest.raises(UserError, match="file not found"):
        mix(MixConfig(sources=[str(tmp_path / "nope.jsonl")], out=out))
    assert not Path(out).exists()
