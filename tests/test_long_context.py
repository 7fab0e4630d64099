"""Long context on the real Gemma 3 270M behind the shared session server (--max-model-len 32768).

- A fact stated at the start of a ~8K-token prompt, far outside the 512-token window of the local
  layers, is recalled: only the global layers (every sixth) can carry it across.
- Greedy parity with transformers on a prompt of more than 2K tokens.
- The KV blocks held by local layers stay bounded by the window while the global layers hold the
  whole prompt (read from /metrics, which takes them from vLLM's KV cache manager).

    pytest tests/test_long_context.py
"""

from __future__ import annotations

import re

import pytest

# A base model continues the last sentence by copying what followed the same words at the start,
# 8K tokens back; the filler has no digits to copy instead.
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
CODE = "4812"
HEAD = f"The secret code is {CODE}. "
TAIL = "The secret code is"


def long_prompt(tokenizer, tokens: int, tail: str = TAIL) -> str:
    """HEAD, then filler up to about `tokens` tokens, then `tail`."""
    per_filler = len(tokenizer(FILLER * 10, add_special_tokens=False).input_ids) / 10
    fixed = len(tokenizer(HEAD + tail, add_special_tokens=False).input_ids)
    return HEAD + FILLER * int((tokens - fixed - 2) / per_filler) + tail


def metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        name: float(value)
        for name, value in re.findall(r"^(gemma_engine_kv_\w+) (\S+)$", text, re.MULTILINE)
    }


@pytest.fixture(scope="module")
def recall(client, tokenizer):
    """The ~8K-token recall request, sent once; the KV test reads the metrics it left."""
    prompt = long_prompt(tokenizer, 8192)
    response = client.completions.create(
        model="gemma-3-270m", prompt=prompt, max_tokens=8, temperature=0
    )
    return prompt, response


def test_fact_far_outside_the_local_window_is_recalled(recall):
    prompt, response = recall
    assert 7800 <= response.usage.prompt_tokens <= 8192
    assert prompt.index(CODE) < 20  # stated in the first few tokens, 8K before the question
    assert CODE in response.choices[0].text, response.choices[0].text


def test_local_layers_hold_the_window_global_layers_hold_everything(recall, http):
    _, response = recall
    kv = metrics(http)
    block, window = kv["gemma_engine_kv_block_size"], kv["gemma_engine_kv_window"]
    assert window == 512
    assert kv["gemma_engine_kv_local_layers"] == 15 and kv["gemma_engine_kv_global_layers"] == 3
    # Global layers keep every token of the longest prompt this server has seen, in each of
    # their groups; local layers keep at most the window plus one scheduled chunk per group.
    local_groups = kv["gemma_engine_kv_local_groups"]
    global_tokens = (
        kv["gemma_engine_kv_global_blocks_peak"] * block / kv["gemma_engine_kv_global_groups"]
    )
    assert global_tokens >= response.usage.prompt_tokens
    local_tokens_per_group = kv["gemma_engine_kv_local_blocks_peak"] * block / local_groups
    chunk = kv["gemma_engine_kv_max_batched_tokens"]
    assert local_tokens_per_group <= window + chunk + 2 * block, kv
    assert local_tokens_per_group < response.usage.prompt_tokens / 2, kv


def test_greedy_parity_with_transformers(client, tokenizer):
    import torch

    from quant import load

    prompt = long_prompt(tokenizer, 2304, tail="Once upon a time, there")
    response = client.completions.create(
        model="gemma-3-270m", prompt=prompt, max_tokens=24, temperature=0, logprobs=0
    )
    assert response.usage.prompt_tokens >= 2048
    served = response.choices[0].logprobs.tokens

    loaded = load("gemma-3-270m")
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    assert len(ids) == response.usage.prompt_tokens
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None
        )
    expected = [tokenizer.decode([token]) for token in out[0, len(ids) :].tolist()]
    assert served == expected
