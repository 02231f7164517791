"""The fake OpenAI server itself, seen over plain HTTP (no SDK): what tests and benchmarks rely on."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from selfinstruct.testing import FakeOpenAI, Reply


def post(server: FakeOpenAI, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1" + path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Name three colors."}]}


def test_completion_shapes_and_usage(fake_openai: FakeOpenAI) -> None:
    status, _, body = post(fake_openai, "/chat/completions", {**CHAT, "n": 2})
    answer = json.loads(body)
    assert status == 200 and answer["object"] == "chat.completion"
    assert [c["message"]["content"] for c in answer["choices"]] == ["answer to: Name three colors."] * 2
    usage = answer["usage"]
    assert usage["completion_tokens"] == 2 * 8 and usage["total_tokens"] == usage["prompt_tokens"] + 16

    status, _, body = post(fake_openai, "/completions", {"model": "fake-model", "prompt": "1. a\n2."})
    answer = json.loads(body)
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == " continued: 1. a\n2."

    conn = http.client.HTTPConnection("127.0.0.1", fake_openai.port, timeout=10)
    conn.request("GET", "/v1/models")
    assert [m["id"] for m in json.loads(conn.getresponse().read())["data"]] == ["fake-model"]
    assert [r.path for r in fake_openai.requests] == ["/v1/chat/completions", "/v1/completions", "/v1/models"]
    assert len(fake_openai.completions()) == 2


def test_script_then_responder_then_default(fake_openai: FakeOpenAI) -> None:
    fake_openai.responder = lambda request: "from responder: " + request["messages"][0]["content"]
    fake_openai.script("first", Reply.length("cut"), Reply.slow(0.2))
    texts = []
    for _ in range(4):
        _, _, body = post(fake_openai, "/chat/completions", CHAT)
        choice = json.loads(body)["choices"][0]
        texts.append((choice["message"]["content"], choice["finish_reason"]))
    assert texts == [
        ("first", "stop"),
        ("cut", "length"),
        ("from responder: Name three colors.", "stop"),  # a scripted delay keeps the responder's text
        ("from responder: Name three colors.", "stop"),
    ]


def test_faults_over_the_wire(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        Reply.rate_limited(2.5),
        Reply.rate_limited(0.25, ms=True),
        Reply.server_error(502),
        Reply.empty_body(),
        Reply.truncated_body(),
        Reply.bad_response_format(),
    )
    answers = [post(fake_openai, "/chat/completions", CHAT) for _ in range(6)]
    assert [a[0] for a in answers] == [429, 429, 502, 200, 200, 400]
    assert answers[0][1]["retry-after"] == "2.5" and answers[1][1]["retry-after-ms"] == "250"
    assert answers[3][2] == b""
    with pytest.raises(json.JSONDecodeError):
        json.loads(answers[4][2])
    assert json.loads(answers[2][2])["error"]["message"]
    assert post(fake_openai, "/chat/completions", {**CHAT, "model": "other"})[0] == 404


def test_reject_response_format_option() -> None:
    with FakeOpenAI(reject_response_format=True) as server:
        assert (
            post(server, "/chat/completions", {**CHAT, "response_format": {"type": "json_object"}})[0] == 400
        )
        assert post(server, "/chat/completions", CHAT)[0] == 200


def test_latency_is_per_connection_and_in_flight_is_tracked() -> None:
    with FakeOpenAI(latency=0.5) as server:
        statuses: list[int] = []
        barrier = threading.Barrier(80)

        def client() -> None:
            barrier.wait()
            statuses.append(post(server, "/chat/completions", CHAT)[0])

        threads = [threading.Thread(target=client) for _ in range(80)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        assert server.max_in_flight >= 64
    assert statuses == [200] * 80 and 0.5 <= elapsed < 3.0  # 80 × 0.5 s one at a time would be 40 s


def test_stop_ends_slow_requests_and_keep_alive_connections() -> None:
    server = FakeOpenAI().start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
    assert conn.getresponse().read()  # the connection stays open (HTTP/1.1 keep-alive)
    server.script(Reply.slow(30))
    slow: list[int] = []
    thread = threading.Thread(target=lambda: slow.append(post(server, "/chat/completions", CHAT)[0]))
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    server.stop()
    thread.join(timeout=5)
    assert time.monotonic() - start < 2 and slow == [503]
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
        conn.getresponse().read()


def test_broken_responder_answers_500_with_the_reason(fake_openai: FakeOpenAI) -> None:
    fake_openai.responder = lambda request: request["missing"]
    status, _, body = post(fake_openai, "/chat/completions", CHAT)
    assert status == 500 and "KeyError('missing')" in json.loads(body)["error"]["message"]
