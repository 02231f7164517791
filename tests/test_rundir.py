"""The run directory's contract (`selfinstruct.rundir`): what a generate run writes is exactly what the module
declares, and the README's outputs table names exactly those files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_type_hints

from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.pipeline.registry import pipeline
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import (
    CLASSIFICATION,
    CORPUS,
    INSTANCES,
    INSTRUCTIONS,
    REJECTED,
    RUN_FILES,
    STATE,
    SUMMARY,
    ClassificationRecord,
    InstancesRecord,
    KeptRecord,
    RejectedRecord,
    Summary,
)
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing.fake_openai import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_outputs_table_names_every_run_file():
    text = README.read_text(encoding="utf-8")
    table = text.split("**Outputs** in `--out`:", 1)[1].split("\n\n", 2)[1]
    named = {name for row in table.splitlines()[2:] for name in re.findall(r"`([\w.]+)`", row.split("|")[1])}
    assert named == set(RUN_FILES)


def test_a_generate_run_writes_the_declared_files_and_record_shapes(tmp_path):
    seeds, out = tmp_path / "seeds.jsonl", tmp_path / "run"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    with FakeOpenAI(responder=PipelineResponder(seed=21, garbage_rate=0.1)) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", backoff=0.01)
        assert (
            run_generate(GenerateConfig(seeds=str(seeds), out=str(out), num_instructions=12, teacher=teacher))
            == 0
        )
    written = {p.name for p in out.iterdir()} - {".lock"}
    assert written == set(RUN_FILES) | {STATE}
    shapes = {REJECTED: RejectedRecord} | {s.output: s.record for s in pipeline("self-instruct") if s.output}
    assert shapes == {
        INSTRUCTIONS: KeptRecord,
        REJECTED: RejectedRecord,
        CLASSIFICATION: ClassificationRecord,
        INSTANCES: InstancesRecord,
        CORPUS: CorpusRecord,
    }
    del shapes[CORPUS]  # a dataclass: its lines are checked below
    for name, shape in shapes.items():
        records = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert records, name
        assert all(set(r) == set(get_type_hints(shape)) for r in records), name
    assert {r["reason"] for r in map(json.loads, (out / REJECTED).read_text().splitlines())} >= {
        "unparseable"
    }
    summary = json.loads((out / SUMMARY).read_text())
    assert set(summary) == set(get_type_hints(Summary)) and summary["finished"] is True
    corpus = [json.loads(line) for line in (out / CORPUS).read_text().splitlines()]
    assert corpus and all(set(r) == {"instruction", "input", "output", "meta"} for r in corpus)
