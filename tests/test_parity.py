"""The server's greedy tokens equal transformers' own greedy generation on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import MODEL

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Photosynthesis is the process by which",
    "import numpy as np\n\n",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant.resolve import resolve_model

    path = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return tokenizer, model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(client, reference, prompt):
    tokenizer, model = reference
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    expected = out[0, ids.input_ids.shape[1] :].tolist()

    served = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert served.usage.prompt_tokens == ids.input_ids.shape[1]
    assert served.choices[0].model_extra["token_ids"] == expected
    assert served.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
