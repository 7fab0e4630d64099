"""Bad requests against the real server: each is a 4xx in OpenAI's error shape naming the field.

A corpus of what clients get wrong (malformed JSON, wrong types, impossible values, bytes that are
not UTF-8, bodies too big or too deep, media that is not base64) is sent as raw bytes, so nothing
on the client side repairs it. After the corpus the server must still answer and hold no request.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Say hi."}]


def _chat(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, "max_tokens": 2, **fields}).encode()


def _completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}).encode()


def _nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


def _media_part(part: dict) -> bytes:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}]
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}).encode()


# (id, path, raw body, the param the error must name)
CORPUS = [
    ("malformed-json", CHAT, b'{"model": "gemma', "body"),
    ("trailing-comma", CHAT, b'{"model": "x", "messages": [],}', "body"),
    ("not-an-object", CHAT, b"[1, 2, 3]", "body"),
    ("messages-a-string", CHAT, _chat(messages="hello"), "messages"),
    ("messages-missing", CHAT, json.dumps({"model": MODEL}).encode(), "messages"),
    ("model-missing", CHAT, json.dumps({"messages": USER}).encode(), "model"),
    ("max-tokens-a-string", CHAT, _chat(max_tokens="ten"), "max_tokens"),
    ("max-tokens-fractional", CHAT, _chat(max_tokens=2.5), "max_tokens"),
    ("empty-messages", CHAT, _chat(messages=[]), "messages"),
    ("unknown-role", CHAT, _chat(messages=[{"role": "wizard", "content": "x"}]), "role"),
    ("content-a-number", CHAT, _chat(messages=[{"role": "user", "content": 7}]), "content"),
    ("content-null", CHAT, _chat(messages=[{"role": "user", "content": None}]), "content"),
    ("unknown-part-type", CHAT, _media_part({"type": "video", "video": "x"}), "content"),
    ("huge-max-tokens", CHAT, _chat(max_tokens=10**12), "max_tokens"),
    ("huge-max-completion-tokens", CHAT, _chat(max_completion_tokens=10**9), "max_completion"),
    ("zero-max-tokens", CHAT, _chat(max_tokens=0), "max_tokens"),
    ("negative-temperature", CHAT, _chat(temperature=-0.5), "temperature"),
    ("nan-temperature", CHAT, _chat(temperature=float("nan")), "temperature"),
    ("top-p-zero", CHAT, _chat(top_p=0), "top_p"),
    ("n-zero", CHAT, _chat(n=0), "n"),
    ("n-huge", CHAT, _chat(n=10_000), "n"),
    ("seed-past-64-bits", CHAT, _chat(seed=2**70), "seed"),
    ("top-k-past-32-bits", CHAT, _chat(top_k=2**40), "top_k"),
    ("empty-stop-string", CHAT, _chat(stop=[""]), "stop"),
    ("stream-a-string", CHAT, _chat(stream="yes please"), "stream"),
    ("unknown-model", CHAT, _chat(model="gpt-9"), "model"),
    ("invalid-utf8", CHAT, _chat()[:-1] + b', "user": "\xff\xfe\xfd"}', "body"),
    ("deeply-nested-content", CHAT, _chat()[:-1] + f', "x": {_nested(100_000)}}}'.encode(), "body"),
    (
        "nested-content-parts",
        CHAT,
        _chat(messages=[{"role": "user", "content": "NESTED"}]).replace(
            b'"NESTED"', _nested(64).encode()
        ),
        "content",
    ),
    (
        "image-not-base64",
        CHAT,
        _media_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}),
        "content",
    ),
    (
        "audio-not-base64",
        CHAT,
        _media_part({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}),
        "content",
    ),
    (
        "audio-unknown-format",
        CHAT,
        _media_part({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}),
        "format",
    ),
    ("prompt-missing", COMPLETIONS, json.dumps({"model": MODEL}).encode(), "prompt"),
    ("prompt-empty-list", COMPLETIONS, _completion(prompt=[]), "prompt"),
    ("prompt-mixed-types", COMPLETIONS, _completion(prompt=[1, "a"]), "prompt"),
    ("token-id-negative", COMPLETIONS, _completion(prompt=[2, -5]), "prompt"),
    ("token-id-past-vocab", COMPLETIONS, _completion(prompt=[2, 999_999_999]), "prompt"),
    ("token-id-past-vocab-list", COMPLETIONS, _completion(prompt=[[2], [2, 10**9]]), "prompt[1]"),
    ("logprobs-too-many", COMPLETIONS, _completion(logprobs=1000), "logprobs"),
    ("token-id-past-vocab-stream", COMPLETIONS, _completion(prompt=[10**9], stream=True), "prompt"),
]


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The body is OpenAI's nested error shape; return its `error` object."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and len(error["message"]) > 10, error
    assert error["type"] in {"invalid_request_error", "not_found_error"}, error
    return error


@pytest.mark.parametrize(
    ("path", "raw", "param"), [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS]
)
def test_bad_request_is_a_4xx_naming_the_field(http, path, raw, param):
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})

    error = assert_openai_error(response)
    assert error["param"] and param in error["param"], error
    assert param.split("[")[0] in error["message"], error


@pytest.mark.parametrize(
    ("path", "body", "missing", "other"),
    [
        (CHAT, {"model": MODEL, "prompt": "Say hi.", "max_tokens": 2}, "messages", COMPLETIONS),
        (COMPLETIONS, {"model": MODEL, "messages": USER, "max_tokens": 2}, "prompt", CHAT),
    ],
    ids=["prompt-sent-to-chat", "messages-sent-to-completions"],
)
def test_the_other_endpoints_field_is_400_pointing_to_that_endpoint(
    http, path, body, missing, other
):
    error = assert_openai_error(http.post(path, json=body), 400)

    assert error["param"] == missing, error
    message = error["message"]
    assert message.startswith(f"{missing}: Field required; this endpoint takes "), message
    sent = "prompt" if missing == "messages" else "messages"
    assert message.endswith(f"send `{sent}` to {other} instead"), message
    if missing == "messages":
        assert '{"role": "user", "content": ...}' in message, message

    # Without the other endpoint's field, the error stays the plain one.
    plain = assert_openai_error(http.post(path, json={"model": MODEL}), 400)
    assert plain["message"] == f"{missing}: Field required", plain


def test_body_over_the_cap_is_413_when_declared(http):
    raw = _chat(messages=[{"role": "user", "content": "a" * (10 * 1024 * 1024)}])

    response = http.post(CHAT, content=raw, headers={"Content-Type": "application/json"})

    error = assert_openai_error(response, 413)
    assert error["param"] == "body" and "limit" in error["message"], error


def test_body_over_the_cap_is_413_when_chunked(http):
    """Without Content-Length the cap is enforced while the body arrives."""

    def chunks():
        yield b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    response = http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})

    error = assert_openai_error(response, 413)
    assert error["param"] == "body" and "limit" in error["message"], error


def test_wrong_method_and_unknown_route_are_openai_shaped(http):
    assert_openai_error(http.get(CHAT), 405)
    assert_openai_error(http.post("/v1/no-such-route", json={}), 404)


def test_server_is_healthy_and_idle_after_the_corpus(http):
    """No bad request left a generation behind in the engine or a slot taken."""
    for raw in (_chat(seed=2**70), _completion(prompt=[10**9]), _chat(stop=[""])):
        http.post(CHAT, content=raw, headers={"Content-Type": "application/json"})

    assert http.get("/health").status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gauges = engine_gauges(http)
        if (
            gauges["gemma_engine_unfinished_requests"] == 0
            and gauges["gemma_requests_in_flight"] == 0
        ):
            break
        time.sleep(1)
    assert gauges["gemma_engine_unfinished_requests"] == 0, gauges
    assert gauges["gemma_requests_in_flight"] == 0, gauges


def engine_gauges(http) -> dict[str, float]:
    text = http.get("/metrics").text
    gauges = {}
    for line in text.splitlines():
        if line.startswith(("gemma_engine_", "gemma_requests_in_flight")):
            name, _, value = line.partition(" ")
            gauges[name] = float(value)
    return gauges
