"""Chat prompts show worked examples as real user/assistant turns (never placeholder answers a small model
copies), and the finetune stage drops instances that loop on themselves."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from selfinstruct.filters.heuristics import Repetitive
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.pipeline.prepare import clean_instances
from selfinstruct.prompts import Demo, Prompts
from selfinstruct.records import Instance
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks

PLACEHOLDER = re.compile(r'"(first|second|third) task"|"\.\.\."|<task>', re.I)


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in small_seed_tasks()))
    return path


def test_chat_demos_become_turns_and_completion_prompts_ignore_them():
    chat = Prompts("chat").get("classify")
    demos = [Demo({"instruction": "Tell whether 41 is even."}, '{"is_classification": true}')]
    messages, prompt = chat.render(demos, examples="", instruction="Write a poem about tea.")
    assert prompt is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Tell whether 41 is even." in messages[1]["content"] and messages[2]["content"] == demos[0].answer
    assert "Write a poem about tea." in messages[3]["content"]
    completion = Prompts("completion").get("classify")
    messages, prompt = completion.render(demos, examples="Task: x\nClassification: No", instruction="Write.")
    assert messages is None and "Tell whether 41" not in prompt and prompt.endswith("Classification:")


def test_every_chat_stage_shows_real_answers_in_its_json_shape(seeds, tmp_path):
    """The assistant turns are parseable JSON built from seed tasks, in the shape the stage's schema asks for;
    no prompt anywhere contains a placeholder answer."""
    for pipeline in ("self-instruct", "alpaca"):
        with FakeOpenAI(responder=PipelineResponder(seed=3)) as server:
            teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", concurrency=4)
            cfg = GenerateConfig(
                seeds=str(seeds),
                out=str(tmp_path / pipeline),
                num_instructions=6,
                pipeline=pipeline,
                teacher=teacher,
                classify_scoring="label",  # the JSON-answering classify prompt (logprob demos answer Yes/No)
            )
            assert run_generate(cfg) == 0
            sent = [r.json for r in server.completions() if r.json.get("max_tokens") != 1]
        seed_texts = {t["instruction"] for t in small_seed_tasks()}
        shapes: Counter[str] = Counter()
        for request in sent:
            messages = request["messages"]
            assert not any(PLACEHOLDER.search(m["content"]) for m in messages), messages
            answers = [json.loads(m["content"]) for m in messages if m["role"] == "assistant"]
            assert answers, "every chat stage shows at least one worked example"
            required = request["response_format"]["json_schema"]["schema"]["required"]
            for answer in answers:
                assert list(answer) == required
                shapes[required[0]] += 1
                if required == ["instructions"]:
                    assert set(answer["instructions"]) <= seed_texts
                if required == ["tasks"]:
                    assert {t["instruction"] for t in answer["tasks"]} <= seed_texts
        expected = (
            {"instructions", "is_classification", "instances"} if pipeline == "self-instruct" else {"tasks"}
        )
        assert set(shapes) == expected


def test_bootstrap_demo_never_repeats_the_prompts_own_examples(seeds, tmp_path):
    with FakeOpenAI(responder=PipelineResponder(seed=4)) as server:
        teacher = TeacherConfig(model="fake-model", base_url=[server.url], api_key_env="", concurrency=2)
        cfg = GenerateConfig(
            seeds=str(seeds),
            out=str(tmp_path / "run"),
            num_instructions=8,
            stages=["bootstrap"],
            teacher=teacher,
        )
        assert run_generate(cfg) == 0
        sent = [r.json for r in server.completions() if r.json.get("max_tokens") != 1]
    for request in sent:
        user_turns = [m["content"] for m in request["messages"] if m["role"] == "user"]
        demo_answer = json.loads(next(m["content"] for m in request["messages"] if m["role"] == "assistant"))
        listed = re.findall(r"^\d+\. (.*)$", user_turns[-1], re.M)
        assert listed and not set(listed) & set(demo_answer["instructions"])


def test_repetitive_flags_loops_but_no_seed_instance():
    rule = Repetitive()
    assert rule("I love to dream. " * 8) == "repetitive"
    assert (
        rule("The answer is 1. The answer is 1. The answer is 1. The answer is 1. The answer is 1.")
        == "repetitive"
    )
    assert rule("Yes") is None and rule("No, no, no.") is None  # short texts are never judged
    seed_file = Path(__file__).resolve().parents[1] / "seeds" / "seed_tasks.jsonl"
    for line in seed_file.read_text().splitlines():
        for inst in json.loads(line)["instances"]:
            assert rule(inst["input"]) is None and rule(inst["output"]) is None


def test_finetune_drops_repetitive_instances_unless_switched_off():
    loop = "It is used to create a new human being. " * 6
    instances = [Instance("DNA", loop), Instance("", "A short, correct answer about DNA and genes.")]
    dropped: Counter[str] = Counter()
    kept = clean_instances(instances, 5, dropped, Repetitive())
    assert [i.output for i in kept] == ["A short, correct answer about DNA and genes."]
    assert dropped == {"repetitive": 1}
    assert len(clean_instances(instances, 5, Counter())) == 2  # the reference's rules alone keep it
