"""The OpenAI-compatible teacher against the fake server: requests, faults, limits, balancing, accounting, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from selfinstruct.errors import UserError
from selfinstruct.teachers import Sampling, TeacherConfig, TeacherRequest, make_teacher
from selfinstruct.teachers.openai_compat import OpenAITeacher, TokenBucket, is_local_url
from selfinstruct.teachers.pricing import lookup_price, resolve_prices
from selfinstruct.testing import FakeOpenAI, Reply

KEY_ENV = "SELFINSTRUCT_TEST_KEY"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def config(*urls: str, **kw) -> TeacherConfig:
    settings = dict(model="fake-model", base_url=list(urls), api_key_env=KEY_ENV, backoff=0.02, timeout=5.0)
    return TeacherConfig(**{**settings, **kw})


def chat(text: str = "hi", **sampling) -> TeacherRequest:
    return TeacherRequest(messages=[{"role": "user", "content": text}], sampling=Sampling(**sampling))


async def started(cfg: TeacherConfig, server: FakeOpenAI | None = None) -> OpenAITeacher:
    """A started teacher; the server forgets the start-up check so tests see only their own requests."""
    teacher = make_teacher(cfg)
    assert isinstance(teacher, OpenAITeacher)
    await teacher.start()
    if server is not None:
        server.clear()
    return teacher


async def run_batch(cfg: TeacherConfig, server: FakeOpenAI, requests: list[TeacherRequest], *replies: Reply):
    teacher = await started(cfg, server)
    server.script(*replies)
    try:
        return teacher, await teacher.generate(requests)
    finally:
        await teacher.close()


# ------------------------------------------------------------------------------------------ requests


def test_chat_and_completions_map_sampling_and_parse_answers(fake_openai: FakeOpenAI) -> None:
    async def main():
        teacher = await started(config(fake_openai.url), fake_openai)
        raw = TeacherRequest(
            prompt="1. Sort a list\n2.",
            sampling=Sampling(max_tokens=7, stop=["\n\n", "16."], repetition_penalty=1.3),
        )
        one = chat(
            "one", n=3, temperature=0.7, top_p=0.5, presence_penalty=2.0, seed=5, max_tokens=33, min_p=0.1
        )
        responses = await teacher.generate([one, raw])
        await teacher.close()
        return responses

    chat_resp, raw_resp = asyncio.run(main())
    assert [c.text for c in chat_resp.choices] == ["answer to: one"] * 3
    assert [c.finish_reason for c in chat_resp.choices] == ["stop"] * 3
    assert raw_resp.choices[0].text == " continued: 1. Sort a list\n2."
    assert chat_resp.usage.completion_tokens == 3 * 4 and chat_resp.usage.prompt_tokens > 0
    sent_chat = fake_openai.completions("/chat/completions")[0].json
    assert sent_chat["messages"] == [{"role": "user", "content": "one"}]
    assert {
        k: sent_chat[k] for k in ("n", "temperature", "top_p", "presence_penalty", "seed", "max_tokens")
    } == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.5,
        "presence_penalty": 2.0,
        "seed": 5,
        "max_tokens": 33,
    }
    assert "frequency_penalty" not in sent_chat and "response_format" not in sent_chat
    # vLLM's extensions travel in the body, and only when set (OpenAI itself refuses unknown fields)
    assert sent_chat["min_p"] == 0.1 and "repetition_penalty" not in sent_chat
    sent_raw = fake_openai.completions("/v1/completions")[0].json
    assert sent_raw["prompt"] == "1. Sort a list\n2." and sent_raw["stop"] == ["\n\n", "16."]
    assert sent_raw["repetition_penalty"] == 1.3 and "min_p" not in sent_raw
    assert sent_raw["max_tokens"] == 7


def test_servers_that_ignore_n_are_asked_again(fake_openai: FakeOpenAI) -> None:
    fake_openai.responder = lambda request: [f"seed {request.get('seed')}"]  # one choice, whatever n says
    teacher, [response] = asyncio.run(run_batch(config(fake_openai.url), fake_openai, [chat(n=3, seed=10)]))
    assert [c.text for c in response.choices] == ["seed 10", "seed 11", "seed 12"]
    assert [r.json["n"] for r in fake_openai.completions()] == [3, 2, 1]
    assert response.usage.completion_tokens == 3 * 2 and teacher.stats.completion_tokens == 6


def test_stream_yields_in_completion_order(fake_openai: FakeOpenAI) -> None:
    fake_openai.responder = lambda req: Reply(text="slow", delay=0.5) if "slow" in str(req) else "fast"

    async def main():
        teacher = await started(config(fake_openai.url), fake_openai)
        order = [(i, r.choices[0].text) async for i, r in teacher.stream([chat("slow"), chat("quick")])]
        await teacher.close()
        return order

    assert asyncio.run(main()) == [(1, "fast"), (0, "slow")]


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Reply.server_error(500), "http_500"),
        (Reply.server_error(503), "http_503"),
        (Reply(status=408, error="timeout"), "http_408"),
        (Reply.empty_body(), "bad_body"),
        (Reply.truncated_body(), "bad_body"),
        (Reply.garbage_body(), "bad_body"),
        (Reply(body=b"{}"), "bad_body"),
    ],
)
def test_transient_faults_are_retried_and_counted(fake_openai: FakeOpenAI, fault: Reply, kind: str) -> None:
    teacher, [response] = asyncio.run(run_batch(config(fake_openai.url), fake_openai, [chat("x")], fault))
    assert response.error is None and response.choices[0].text == "answer to: x"
    assert teacher.stats.retries == 1 and teacher.stats.errors_by_kind == {kind: 1}
    assert teacher.stats.requests == 1 and teacher.stats.failed_requests == 0
    assert len(fake_openai.completions()) == 2


def test_slow_response_times_out_and_is_retried(fake_openai: FakeOpenAI) -> None:
    cfg = config(fake_openai.url, timeout=0.4)
    start = time.monotonic()
    teacher, [response] = asyncio.run(run_batch(cfg, fake_openai, [chat("x")], Reply.slow(3.0)))
    assert response.choices[0].text == "answer to: x"
    assert teacher.stats.errors_by_kind == {"timeout": 1} and teacher.stats.retries == 1
    assert time.monotonic() - start < 2.5  # did not wait for the slow answer


@pytest.mark.parametrize(("seconds", "ms"), [(0.8, False), (0.6, True)])
def test_retry_after_is_honoured(fake_openai: FakeOpenAI, seconds: float, ms: bool) -> None:
    cfg = config(fake_openai.url, backoff=0.01)
    teacher, [response] = asyncio.run(
        run_batch(cfg, fake_openai, [chat()], Reply.rate_limited(seconds, ms=ms))
    )
    assert response.error is None
    first, second = fake_openai.completions()
    assert seconds <= second.time - first.time < seconds + 0.5
    assert teacher.stats.errors_by_kind == {"http_429": 1}


def test_length_and_garbage_text_are_answers_not_errors(fake_openai: FakeOpenAI) -> None:
    teacher, (cut, junk) = asyncio.run(
        run_batch(
            config(fake_openai.url), fake_openai, [chat("a"), chat("b")], Reply.length(), Reply.garbage_text()
        )
    )
    answers = {r.choices[0].finish_reason: r.choices[0].text for r in (cut, junk)}
    assert answers["length"].startswith("1. Write a poem")
    assert answers["stop"] == Reply.garbage_text().text
    assert teacher.stats.retries == 0 and teacher.stats.errors_by_kind == {}


def test_client_errors_are_not_retried(fake_openai: FakeOpenAI) -> None:
    bad = Reply(status=400, error="This model's maximum context length is 2048 tokens")
    teacher, (failed, ok) = asyncio.run(
        run_batch(config(fake_openai.url, concurrency=1), fake_openai, [chat("a"), chat("b")], bad)
    )
    assert failed.choices == [] and "HTTP 400: This model's maximum context length" in failed.error
    assert "after 1 attempt," in failed.error
    assert ok.error is None
    assert teacher.stats.failed_requests == 1 and teacher.stats.retries == 0
    assert len(fake_openai.completions()) == 2


def test_exhausted_retries_on_every_endpoint_stop_the_run(fake_openai: FakeOpenAI) -> None:
    cfg = config(fake_openai.url, max_retries=2)
    with pytest.raises(UserError, match=r"every teacher endpoint keeps failing after 2 retries: .*HTTP 500"):
        asyncio.run(run_batch(cfg, fake_openai, [chat()], *[Reply.server_error()] * 3))
    assert len(fake_openai.completions()) == 3


@pytest.mark.parametrize(
    "fault",
    [
        Reply(status=401, error="Incorrect API key provided"),
        Reply(status=429, error="You exceeded your current quota", code="insufficient_quota"),
    ],
)
def test_refused_key_or_quota_stops_the_run_at_once(fake_openai: FakeOpenAI, fault: Reply) -> None:
    with pytest.raises(
        UserError, match=f"{fake_openai.url} refused the request: HTTP {fault.status}: {fault.error}"
    ):
        asyncio.run(run_batch(config(fake_openai.url), fake_openai, [chat()], fault))
    assert len(fake_openai.completions()) == 1  # not retried


# ------------------------------------------------------------------------------------------ start-up checks


def test_wrong_model_is_one_clear_error_at_start(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(UserError) as err:
        asyncio.run(make_teacher(config(fake_openai.url, model="gpt-nope")).start())
    message = str(err.value)
    assert "'gpt-nope'" in message and "not found" in message and fake_openai.url in message
    assert "\n" not in message


def test_unreachable_endpoint_is_one_clear_error_at_start(fake_openai: FakeOpenAI) -> None:
    dead = FakeOpenAI().start()
    url = dead.url
    dead.stop()
    with pytest.raises(UserError, match=f"cannot reach teacher at {url}"):
        asyncio.run(make_teacher(config(url)).start())


def test_missing_key_for_remote_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=f"set the API key in \\${KEY_ENV}"):
        asyncio.run(make_teacher(config("https://api.example.com/v1")).start())
    with pytest.raises(UserError, match=r"\$OPENAI_API_KEY .*api.openai.com"):
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        asyncio.run(make_teacher(TeacherConfig()).start())


def test_local_urls_need_no_key(fake_openai: FakeOpenAI) -> None:
    asyncio.run(run_batch(config(fake_openai.url), fake_openai, [chat()]))
    assert fake_openai.completions()[0].headers["authorization"] == "Bearer no-key"
    assert is_local_url("http://localhost:11434/v1") and is_local_url("http://10.1.2.3:8000/v1")
    assert is_local_url("http://gpu-node-7:8000/v1") and is_local_url("http://[::1]:8000/v1")
    assert not is_local_url("https://api.openai.com/v1") and not is_local_url("http://8.8.8.8/v1")


# ------------------------------------------------------------------------------------------ structured output

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"]}


def test_structured_output_sends_json_schema(fake_openai: FakeOpenAI) -> None:
    _teacher, [response] = asyncio.run(
        run_batch(config(fake_openai.url), fake_openai, [chat(json_schema=SCHEMA)], '{"label": "yes"}')
    )
    assert response.structured and json.loads(response.choices[0].text) == {"label": "yes"}
    fmt = fake_openai.completions()[0].json["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == SCHEMA


def test_structured_output_off_sends_no_schema(fake_openai: FakeOpenAI) -> None:
    cfg = config(fake_openai.url, structured_output=False)
    _, [response] = asyncio.run(run_batch(cfg, fake_openai, [chat(json_schema=SCHEMA)]))
    assert not response.structured and "response_format" not in fake_openai.completions()[0].json


def test_rejected_response_format_falls_back_to_text_for_the_run(caplog: pytest.LogCaptureFixture) -> None:
    requests = [chat(str(i), json_schema=SCHEMA) for i in range(5)]
    with FakeOpenAI(reject_response_format=True) as server, caplog.at_level(logging.WARNING):
        teacher, responses = asyncio.run(run_batch(config(server.url, concurrency=1), server, requests))
        sent = [r.json for r in server.completions()]
    assert all(r.error is None and not r.structured for r in responses)
    assert [("response_format" in s) for s in sent] == [True] + [False] * 5  # rejected once, then plain text
    assert not teacher.structured_supported and teacher.stats.retries == 0
    assert sum("rejected response_format" in m for m in caplog.messages) == 1


def test_other_400_on_a_schema_request_keeps_structured_output(fake_openai: FakeOpenAI) -> None:
    too_long = Reply(status=400, error="maximum context length exceeded")
    requests = [chat("a", json_schema=SCHEMA), chat("b", json_schema=SCHEMA)]
    teacher, (failed, ok) = asyncio.run(
        run_batch(config(fake_openai.url, concurrency=1), fake_openai, requests, too_long, too_long)
    )
    assert "maximum context length" in failed.error and ok.structured
    assert teacher.structured_supported
    assert ["response_format" in r.json for r in fake_openai.completions()] == [True, False, True]


# ------------------------------------------------------------------------------------------ throughput controls


def test_concurrency_limit_is_what_the_server_sees() -> None:
    with FakeOpenAI(latency=0.15) as server:
        _teacher, responses = asyncio.run(
            run_batch(config(server.url, concurrency=4), server, [chat(str(i)) for i in range(20)])
        )
        assert server.max_in_flight == 4
    assert all(r.error is None for r in responses)


def test_64_concurrent_requests_are_served_in_parallel() -> None:
    with FakeOpenAI(latency=0.3) as server:
        start = time.monotonic()
        _, responses = asyncio.run(
            run_batch(config(server.url, concurrency=64), server, [chat(str(i)) for i in range(64)])
        )
        elapsed = time.monotonic() - start
        assert server.max_in_flight == 64
    assert all(r.error is None for r in responses)
    assert elapsed < 2.0  # 64 × 0.3 s serially would be 19 s


def test_rpm_limit_spaces_requests(fake_openai: FakeOpenAI) -> None:
    asyncio.run(run_batch(config(fake_openai.url, rpm=240), fake_openai, [chat(str(i)) for i in range(12)]))
    times = sorted(r.time for r in fake_openai.completions())
    # 240/min = 4/s with a burst of 4: request k (0-based) cannot start before (k - 3) / 4 s
    for k, t in enumerate(times):
        assert t - times[0] >= (k - 3) / 4 - 0.05
    assert times[-1] - times[0] < (12 - 4) / 4 + 1.0


def test_token_bucket_tpm_counts_prompt_and_max_tokens() -> None:
    async def main():
        bucket = TokenBucket(per_minute=6000)  # 100 tokens/s, burst 100
        start = time.monotonic()
        for _ in range(4):
            await bucket.take(50)
        return time.monotonic() - start

    assert 0.9 <= asyncio.run(main()) < 1.5  # 200 tokens: 100 from the burst, then 100 at 100/s


# ------------------------------------------------------------------------------------------ fleets


def test_requests_are_balanced_over_endpoints() -> None:
    with FakeOpenAI(latency=0.05) as a, FakeOpenAI(latency=0.05) as b:
        _, responses = asyncio.run(
            run_batch(config(a.url, b.url, concurrency=8), a, [chat(str(i)) for i in range(40)])
        )
        counts = len(a.completions()), len(b.completions()) - 1  # b still holds its start-up check
    assert all(r.error is None for r in responses)
    assert sum(counts) == 40 and min(counts) >= 15


def test_dead_endpoint_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    dead = FakeOpenAI().start()
    dead_url = dead.url
    dead.stop()
    with FakeOpenAI() as live, caplog.at_level(logging.WARNING):
        _teacher, responses = asyncio.run(
            run_batch(config(dead_url, live.url), live, [chat() for _ in range(10)])
        )
        assert len(live.completions()) == 10
    assert all(r.error is None for r in responses)
    assert any(dead_url in m and "unreachable" in m for m in caplog.messages)


def test_endpoint_dying_mid_run_fails_over() -> None:
    async def main(a: FakeOpenAI, b: FakeOpenAI):
        teacher = await started(config(a.url, b.url, concurrency=4, backoff=1.0))
        b.stop()
        responses = await teacher.generate([chat(str(i)) for i in range(20)])
        await teacher.close()
        return teacher, responses

    with FakeOpenAI() as a, FakeOpenAI() as b:
        teacher, responses = asyncio.run(main(a, b))
    assert all(r.error is None for r in responses)
    assert teacher.stats.errors_by_kind.get("connection", 0) >= 1
    assert teacher.stats.errors_by_kind["connection"] == 2  # two failures in a row: skipped for a while


# ------------------------------------------------------------------------------------------ accounting


def test_usage_and_cost_totals(fake_openai: FakeOpenAI) -> None:
    cfg = config(fake_openai.url, price_input=1.0, price_output=2.0)
    requests = [chat("word " * i, n=1 + i % 3) for i in range(9)]
    teacher, responses = asyncio.run(run_batch(cfg, fake_openai, requests, Reply.server_error()))
    s = teacher.stats
    assert s.requests == 9 and s.retries == 1
    assert s.prompt_tokens == sum(r.usage.prompt_tokens for r in responses) > 0
    assert s.completion_tokens == sum(r.usage.completion_tokens for r in responses) > 0
    assert s.cost == pytest.approx((s.prompt_tokens * 1.0 + s.completion_tokens * 2.0) / 1e6)
    assert s.cost == pytest.approx(sum(r.cost for r in responses))


def test_price_table() -> None:
    assert lookup_price("gpt-4o-mini-2024-07-18") == lookup_price("gpt-4o-mini") == (0.15, 0.60)
    assert lookup_price("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert lookup_price("openai/gpt-4.1-nano") == (0.10, 0.40)
    assert lookup_price("my-local-llama") is None
    assert resolve_prices("gpt-4o", 1.0, None) == (1.0, 10.00)
    assert resolve_prices("/models/llama", None, None) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------ secrets


def test_api_key_never_appears_in_messages_or_written_files(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from selfinstruct.config import config_to_toml

    key = "sk-test-UNIQUE-9f3b2c7d1e"
    monkeypatch.setenv(KEY_ENV, key)
    echo = Reply(status=400, error=f"Incorrect API key provided: {key}")  # providers do echo (parts of) keys
    with FakeOpenAI() as server, caplog.at_level(logging.DEBUG):
        teacher, (failed, ok) = asyncio.run(
            run_batch(config(server.url, concurrency=1), server, [chat("a"), chat("b")], echo)
        )
        assert server.completions()[0].headers["authorization"] == f"Bearer {key}"  # the key is used…
        server.script(Reply(status=401, error=f"bad key {key}"))
        with pytest.raises(UserError) as err:
            asyncio.run(make_teacher(config(server.url)).start())
    assert ok.error is None and "***" in failed.error
    (tmp_path / "teacher.toml").write_text(config_to_toml("generate", teacher.cfg))
    (tmp_path / "responses.json").write_text(json.dumps([r.error for r in (failed, ok)]))
    (tmp_path / "stats.json").write_text(json.dumps(teacher.stats.__dict__))
    (tmp_path / "log.txt").write_text("\n".join(caplog.messages) + "\n" + str(err.value))
    assert "***" in str(err.value) and "rejected the API key" in str(err.value)
    for path in tmp_path.iterdir():  # …but never written anywhere
        assert key not in path.read_text(), path


# ------------------------------------------------------------------------------------------ config


def test_config_fields_and_urls() -> None:
    cfg = TeacherConfig(base_url="http://a:8000/v1/, http://b:8000/v1")
    assert cfg.base_url == ["http://a:8000/v1", "http://b:8000/v1"]
    assert all(f.description for f in TeacherConfig.model_fields.values())
    assert not any("key" in name and not name.endswith("_env") for name in TeacherConfig.model_fields)
    with pytest.raises(ValueError, match="must start with http"):
        TeacherConfig(base_url=["localhost:8000"])
    assert TeacherConfig.model_fields["backend"].json_schema_extra == {"flag": "--teacher"}
    assert make_teacher(TeacherConfig()).concurrency == 32
    assert make_teacher(TeacherConfig(backend="vllm")).concurrency == 256  # vLLM wants whole rounds at once
    assert make_teacher(TeacherConfig(backend="vllm", concurrency=8)).concurrency == 8
