"""The transformers engine serves the same API on the real model (where vLLM cannot run)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL, start_server, stop_server


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hf-engine") / "server.log"
    running = start_server(["--model", MODEL, "--engine", "transformers",
                            "--max-model-len", "4096"], log)  # fmt: skip
    yield running
    stop_server(running.process)


@pytest.fixture(scope="module")
def hf_client(hf_server):
    from openai import OpenAI

    return OpenAI(base_url=hf_server.base_url, api_key="unused", max_retries=0, timeout=300)


def test_models_and_health_say_the_transformers_engine_serves_bf16(hf_server):
    expected = {"bits": 16, "method": "none", "dtype": "bfloat16", "engine": "transformers"}
    models = httpx.get(f"{hf_server.base_url}/models", timeout=30).json()["data"]
    assert [(m["id"], m["quantization"]) for m in models] == [(MODEL, expected)]
    health = httpx.get(f"{hf_server.url}/health", timeout=30).json()
    assert (health["engine"], health["quantization"]) == ("transformers", expected)


def test_greedy_text_equals_the_vllm_engines(client, hf_client):
    args = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    assert hf_client.completions.create(**args).choices[0].text == (
        client.completions.create(**args).choices[0].text
    )


def test_streaming_chat_usage_stop_and_logprobs(hf_client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name three fruits."}]  # fmt: skip
    full = hf_client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = list(hf_client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [full.usage.completion_tokens]
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in full.choices[0].logprobs.content)

    stopped = hf_client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[" 7"]
    )
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"

    several = hf_client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, seed=3)
    assert [c.index for c in several.choices] == [0, 1]


@pytest.fixture(scope="module")
def three_bit(tmp_path_factory):
    """`--bits 3`: vLLM loads no 3-bit format, so the transformers engine serves quant.load's."""
    log = tmp_path_factory.mktemp("hf-engine-3bit") / "server.log"
    running = start_server(["--model", MODEL, "--bits", "3", "--max-model-len", "2048"], log)
    yield running
    stop_server(running.process)


def test_a_3_bit_model_is_served_by_the_transformers_engine(three_bit):
    from openai import OpenAI

    expected = {"bits": 3, "method": "gptq", "dtype": "bfloat16", "engine": "transformers"}
    health = httpx.get(f"{three_bit.url}/health", timeout=30).json()
    assert (health["engine"], health["quantization"]) == ("transformers", expected)
    client = OpenAI(base_url=three_bit.base_url, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    text = reply.choices[0].message.content
    assert sum(ch.isalpha() for ch in text) >= 3, text
    assert reply.usage.completion_tokens > 0
