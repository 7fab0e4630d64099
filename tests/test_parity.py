"""The server's greedy tokens equal transformers' own greedy generation on the same checkpoint.

Both run the model in bf16, but with different kernels (vLLM's CPU attention and GEMMs against
PyTorch's), so two candidate tokens whose log-probabilities differ by less than bf16's rounding can
swap places, and free-running greedy decoding then goes its own way. The test therefore asks for
exact equality with `model.generate`, and where the two part, it replays the server's tokens
through transformers (teacher forcing) and requires that every token the server chose is one
transformers also ranks top, or within a bf16 tie (TIE_NATS) of its top.
"""

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
TIE_NATS = 0.1  # bf16 keeps ~3 significant digits: logits near 20 carry errors of ~0.05


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
    prompt_ids = tokenizer(prompt).input_ids
    served = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    served_ids = served.choices[0].model_extra["token_ids"]
    assert served.usage.prompt_tokens == len(prompt_ids)
    assert len(served_ids) == NEW_TOKENS

    with torch.inference_mode():
        generated = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None,
        )[0, len(prompt_ids) :].tolist()  # fmt: skip
    if generated == served_ids:
        return

    agree = next(i for i, (a, b) in enumerate(zip(generated, served_ids, strict=True)) if a != b)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + served_ids])).logits[0].float()
    logprobs = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    for position, token in enumerate(served_ids):
        margin = float(logprobs[position].max() - logprobs[position, token])
        assert margin <= TIE_NATS, (
            f"token {position} ({tokenizer.decode([token])!r}) is {margin:.3f} nats below "
            f"transformers' top choice; the first {agree} tokens agreed exactly"
        )
