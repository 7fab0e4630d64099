"""The main job, end to end: the real server on the real Gemma 3 270M, driven by the `openai`
client exactly as a user would."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import MODEL

GREEDY = {"temperature": 0}


def test_models_lists_the_served_model(client):
    ids = [model.id for model in client.models.list().data]
    assert MODEL in ids


BF16_ON_VLLM = {"bits": 16, "method": "none", "dtype": "bfloat16", "engine": "vllm"}


def test_models_and_health_say_the_quantisation_level(client, http):
    listed = {model.id: model for model in client.models.list().data}
    # An extra field beyond OpenAI's, kept by its client as any unknown field.
    assert listed[MODEL].quantization == BF16_ON_VLLM
    assert listed[MODEL].max_model_len == 32768 and listed[MODEL].parent is None
    health = http.get("/health").json()
    assert health == {
        "status": "ok", "model": MODEL, "engine": "vllm", "quantization": BF16_ON_VLLM
    }  # fmt: skip


def test_greedy_code_completion_writes_a_function(client):
    result = client.completions.create(
        model=MODEL, prompt="def fibonacci(n):", max_tokens=48, **GREEDY
    )
    assert "return" in result.choices[0].text
    assert result.usage.completion_tokens > 0


def test_chat_with_system_message_answers(client):
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name a colour."},
        ],
        max_tokens=16,
        **GREEDY,
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")


def test_string_and_text_parts_give_the_same_prompt(client):
    as_string = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=4, **GREEDY
    )
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        max_tokens=4,
        **GREEDY,
    )
    assert as_string.usage.prompt_tokens == as_parts.usage.prompt_tokens
    assert as_string.choices[0].message.content == as_parts.choices[0].message.content


def test_streamed_chat_equals_non_streamed_with_one_usage_chunk(client):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1
    assert with_usage[0].usage.completion_tokens == full.usage.completion_tokens
    assert with_usage[0].usage.prompt_tokens == full.usage.prompt_tokens


def test_streamed_completion_equals_non_streamed(client):
    args = dict(model=MODEL, prompt="The three primary colours are", max_tokens=24, **GREEDY)
    full = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
    assert streamed == full.choices[0].text


def test_exactly_one_bos_on_completion_and_chat(client, tokenizer):
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, **GREEDY)
    with_bos = client.completions.create(model=MODEL, prompt="<bos>Hello", max_tokens=1, **GREEDY)
    expected = len(tokenizer("Hello").input_ids)  # the converted tokenizer adds one BOS
    assert tokenizer("Hello").input_ids.count(tokenizer.bos_token_id) == 1
    assert plain.usage.prompt_tokens == expected
    assert with_bos.usage.prompt_tokens == expected

    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **GREEDY)
    assert chat.usage.prompt_tokens == len(ids)


def test_every_end_id_stops_and_none_is_returned(tokenizer):
    # The 270M base model never emits its (untrained) special tokens, so the stop path is shown
    # on the policy and the decoder here; test_adapters shows a fine-tuned adapter ending its turn
    # through the server with finish_reason "stop" and no marker in the text.
    from quant.chat import ChatPolicy
    from quant.resolve import resolve_model
    from serve.engine.base import GenerationRequest, SamplingOptions
    from serve.engine.hf_engine import _Decoder

    path = resolve_model(MODEL).path
    policy = ChatPolicy(tokenizer, path / "generation_config.json")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert set(policy.stop_token_ids) == {tokenizer.eos_token_id, end_of_turn}

    for end_id in policy.stop_token_ids:
        options = SamplingOptions(max_tokens=8, stop_token_ids=policy.stop_token_ids)
        decoder = _Decoder(tokenizer, GenerationRequest("r", [2], options), 0)
        first = decoder.push(tokenizer.encode("Hi", add_special_tokens=False)[0], None)
        last = decoder.push(end_id, None)
        assert first.text + last.text == "Hi"
        assert last.finish_reason == "stop"
        assert decoder.push(tokenizer.encode("x", add_special_tokens=False)[0], None) is None


def test_sampling_parameters_are_honoured(client):
    args = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        extra_body={"top_k": 40},  # not in the openai signature; vLLM and we accept it
        seed=1234,
    )
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    assert first.choices[0].text == again.choices[0].text  # same seed, same sample

    several = client.completions.create(**{**args, "n": 3, "seed": None})
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.text for c in several.choices}) > 1  # three samples, not one copied
    assert several.usage.completion_tokens > 16  # counted over all three choices

    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=32, stop=[" 7"], **GREEDY
    )
    assert " 7" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"

    capped = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to fifty."}],
        max_completion_tokens=5, **GREEDY,
    )  # fmt: skip
    assert capped.usage.completion_tokens == 5
    assert capped.choices[0].finish_reason == "length"

    penalised = client.completions.create(
        model=MODEL, prompt="the the the", max_tokens=8, presence_penalty=1.5,
        frequency_penalty=1.5, **GREEDY,
    )  # fmt: skip
    assert penalised.choices[0].text


def test_logprobs_on_chat_and_completion(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True,
        top_logprobs=3, **GREEDY,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)

    completion = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, logprobs=2, **GREEDY
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_health_and_metrics(http, client):
    assert http.get("/health").json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **GREEDY)
    text = http.get("/metrics").text
    assert "gemma_generation_tokens_total" in text
    assert "gemma_engine_unfinished_requests" in text


# -- errors -------------------------------------------------------------------------------------


def _error(http, path: str, body, status: int) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


def test_malformed_json_is_400(http):
    error = _error(http, "/v1/chat/completions", b'{"model": "gemma-3-270m", "messages": [', 400)
    assert "JSON" in error["message"]


def test_schema_violation_is_400_naming_the_field(http):
    error = _error(
        http,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
    )
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]

    error = _error(
        http,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        400,
    )
    assert error["param"] == "messages.0.role"


def test_context_overflow_is_400_with_limit_and_count(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=40000)
    message = caught.value.body["message"]
    assert "32768" in message and "40002" in message
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.body["param"] == "max_tokens"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.body["param"] == "model"
    assert "no-such-model" in caught.value.body["message"]


def test_tool_messages_get_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "1", "type": "function",
                     "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            ],
            max_tokens=4,
        )  # fmt: skip
    assert "tool format" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages[1]"


def test_unknown_fields_are_accepted_and_logged(client, server):
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"frobnicate_level": 3}, **GREEDY,
    )  # fmt: skip
    assert result.choices
    assert "frobnicate_level" in server.log()


def test_ignore_eos_is_a_known_field_and_runs_to_max_tokens(client, server):
    result = client.completions.create(
        model=MODEL, prompt="The end.", max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert result.usage.completion_tokens == 12
    assert result.choices[0].finish_reason == "length"
    assert "ignore_eos" not in server.log()


def test_json_without_a_content_type_is_still_read(http):
    # `curl -d '{...}'` sends no Content-Type header; the body is JSON all the same.
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    response = http.post("/v1/completions", content=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "a\\udba5b"}]}',
        b'{"model": "gemma-\\udba5", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "gemma-3-270m", "prompt": "hi", "\\udba5": {"\\udfe5": []}}',
    ],
    ids=["content", "model", "unknown-key"],
)
def test_lone_surrogates_are_400_not_500(http, raw):
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_nul_in_an_adapter_path_is_400_not_500(http):
    # Found by schemathesis: a NUL reached os.stat and came back as a 500.
    response = http.post("/v1/load_lora_adapter",
                         json={"lora_name": "x", "lora_path": "adapter\u0000name"})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "lora_path"
