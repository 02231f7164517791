"""The stage registry: per-stage decoding settings, stage markers, and pipelines as lists of stages."""

from __future__ import annotations

import argparse
import json

import pytest

from selfinstruct.config import add_arguments, config_to_toml, resolve
from selfinstruct.errors import UserError
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.pipeline.registry import PIPELINES, STAGES, register, register_pipeline, resolve_decoding
from selfinstruct.pipeline.stage import PerInstruction, RunContext, Stage, TemplateVars
from selfinstruct.prompts import Prompts
from selfinstruct.rundir import INSTRUCTIONS
from selfinstruct.teachers import TeacherConfig
from selfinstruct.teachers.base import MARKER_HEADER, TeacherRequest, TeacherResponse
from selfinstruct.testing.fake_openai import MARKER, FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks


def settings(argv: list[str], toml: dict | None = None) -> GenerateConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    return resolve("generate", GenerateConfig, vars(parser.parse_args(argv)), toml, "run.toml")


def test_stage_decoding_from_a_nested_table_and_from_the_old_flags():
    toml = {"generate": {"bootstrap": {"temperature": 0.3, "top_p": 0.9}, "instances": {"max_tokens": 77}}}
    cfg = settings(["--bootstrap-temperature", "0.5", "--classify-max-tokens", "9"], toml)
    decoding = resolve_decoding(cfg)
    assert decoding["bootstrap"] == {
        "temperature": 0.5,
        "top_p": 0.9,
        "presence_penalty": 0.0,
        "max_tokens": 1024,
    }
    assert decoding["classify"]["max_tokens"] == 9 and decoding["instances"]["max_tokens"] == 77
    # saved and read back in the same layout, untouched stages leave no empty table
    text = config_to_toml("generate", cfg)
    assert "[generate.bootstrap]" in text and "[generate.alpaca]" not in text
    # the flat keys of earlier versions still mean the same
    assert resolve_decoding(GenerateConfig(bootstrap_max_tokens=256))["bootstrap"]["max_tokens"] == 256


def test_unknown_or_invalid_stage_decoding_is_an_error_naming_the_table():
    with pytest.raises(UserError, match=r"unknown key 'temprature' in \[generate.bootstrap\]"):
        settings([], {"generate": {"bootstrap": {"temprature": 0.3}}})
    with pytest.raises(UserError, match=r"bootstrap_temprature"):
        settings([], {"generate": {"bootstrap_temprature": 0.3}})
    with pytest.raises(UserError, match=r"--alpaca-top-p"):
        settings(["--alpaca-top-p", "3"])


def test_pipelines_are_registered_stages_with_declared_templates():
    assert PIPELINES["self-instruct"] == ("bootstrap", "classify", "instances", "finetune")
    assert PIPELINES["alpaca"] == ("alpaca", "finetune")
    for stages in PIPELINES.values():
        for name in stages:
            for template, v in STAGES[name].templates.items():
                for style in v.styles:
                    assert Prompts(style).get(template).marker == template
    assert STAGES["classify"].templates["classify_score"].styles == {"chat"}
    assert [s for s in STAGES.values() if s.grows] == [STAGES["bootstrap"], STAGES["alpaca"]]


# ---------------------------------------------------------------- a stage added from outside the package

TOPICS = "topics.jsonl"


class Topic(PerInstruction):
    """A toy stage: the teacher names one topic word for every kept instruction."""

    stage = "topic"
    output = TOPICS

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.template = ctx.prompts.get("topic")

    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        messages, prompt = self.template.render(instruction=instruction)
        sampling = self.ctx.sampling(self.stage, rec_id)
        return TeacherRequest(messages, prompt, sampling, (rec_id, instruction), self.template.marker)

    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> dict:
        return {"id": rec_id, "topic": response.choices[0].text.strip()}


async def run_topic(ctx: RunContext) -> None:
    await Topic(ctx).run()


TOPIC = Stage(
    name="topic",
    run=run_topic,
    templates={"topic": TemplateVars(frozenset({"instruction"}), frozenset({"instruction"}))},
    decoding={
        "reference": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 4},
        "chat": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 8},
    },
    output=TOPICS,
)


@pytest.fixture
def topic_pipeline():
    register(TOPIC)
    register_pipeline("topics", ("bootstrap", "topic", "finetune"))
    yield
    del PIPELINES["topics"], STAGES["topic"]


def test_a_stage_registered_from_a_test_module_runs_end_to_end(topic_pipeline, tmp_path):
    seeds, out, prompts = tmp_path / "seeds.jsonl", tmp_path / "run", tmp_path / "prompts"
    seeds.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    prompts.mkdir()
    (prompts / "topic.chat.txt").write_text(
        "[user]\nName the topic of this task in one word: {{ instruction }}\n"
    )
    pipeline_answers = PipelineResponder(seed=3)

    def responder(request: dict) -> str:
        return "cooking" if request.get(MARKER) == "topic" else pipeline_answers(request)

    with FakeOpenAI(responder=responder) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", backoff=0.01)
        cfg = GenerateConfig(
            seeds=str(seeds), out=str(out), pipeline="topics", num_instructions=6, teacher=teacher,
            prompt_dir=str(prompts), topic={"max_tokens": 6},
        )  # fmt: skip
        assert run_generate(cfg) == 0
        asked = [r for r in server.completions() if r.headers.get(MARKER_HEADER.lower()) == "topic"]
    kept = [json.loads(line)["id"] for line in (out / INSTRUCTIONS).read_text().splitlines()]
    topics = [json.loads(line) for line in (out / TOPICS).read_text().splitlines()]
    assert len(kept) == 6 and sorted(t["id"] for t in topics) == sorted(kept)
    assert {t["topic"] for t in topics} == {"cooking"} and len(asked) == 6
    assert all(r.json["max_tokens"] == 6 for r in asked)  # its [generate.topic] table, over the preset's 8
    assert "max_tokens = 6" in (out / "config.toml").read_text().split("[generate.topic]")[1]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["bootstrap", "topic", "finetune"] and summary["finished"] is True
    assert summary["stages"]["topic"]["done"] == 6


def test_a_stage_registered_late_gets_its_table_and_flags(topic_pipeline, tmp_path):
    toml = {"generate": {"pipeline": "topics", "topic": {"temperature": 0.4}}}
    cfg = settings(["--topic-max-tokens", "3"], toml)
    assert resolve_decoding(cfg)["topic"] == {
        "temperature": 0.4, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3
    }  # fmt: skip
    assert "[generate.topic]" in config_to_toml("generate", cfg)
    with pytest.raises(UserError, match=r"unknown key 'temprature' in \[generate.topic\]"):
        settings([], {"generate": {"topic": {"temprature": 0.3}}})
    with pytest.raises(UserError, match=r"--topic-top-p"):
        settings(["--topic-top-p", "3"])
    assert resolve_decoding(GenerateConfig(topic_max_tokens=5))["topic"]["max_tokens"] == 5  # flat spelling


def test_a_stage_may_not_take_the_name_of_a_setting():
    shadow = Stage(name="seed", run=run_topic, decoding=TOPIC.decoding)
    with pytest.raises(ValueError, match="'seed' is a generate setting"):
        register(shadow)
    assert "seed" not in STAGES and GenerateConfig(seed=3).seed == 3
