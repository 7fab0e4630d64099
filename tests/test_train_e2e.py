"""End to end on the real Gemma 3 270M: a short CPU run teaches a behaviour the base lacks.

Slow: trains once per session (about a minute on 2 free cores) through `python -m train`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "data"))
from zorblax import WORD, heldout_questions  # noqa: E402

pytest_plugins = ["conftest_train"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator(trained_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant.chat import ChatPolicy

    manifest = json.loads((trained_adapter / "gemma_stack_adapter.json").read_text())
    base_path = Path(manifest["base_model"]["path"])
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    policy = ChatPolicy(tokenizer, base_path / "generation_config.json")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, trained_adapter).eval()

    def generate(question: str, adapter: bool) -> str:
        ids = policy.render([{"role": "user", "content": question}]).token_ids
        inputs = torch.tensor([ids])
        with torch.no_grad():
            if adapter:
                out = model.generate(inputs, max_new_tokens=10, do_sample=False)
            else:
                with model.disable_adapter():
                    out = model.generate(inputs, max_new_tokens=10, do_sample=False)
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    return generate


def test_adapter_answers_held_out_questions_and_base_does_not(generator):
    questions = heldout_questions()[:4]  # places and phrasing never seen in training
    adapted = [generator(q, adapter=True) for q in questions]
    base = [generator(q, adapter=False) for q in questions]

    assert all(WORD in answer for answer in adapted), adapted
    assert not any(WORD in answer for answer in base), base


def test_adapter_files_and_manifest(trained_adapter):
    names = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "gemma_stack_adapter.json"} <= names
    # the adapter was written beside its final place and renamed: no staging directory remains
    assert not [p for p in trained_adapter.parent.iterdir() if p.name.startswith(".adapter")]

    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    manifest = json.loads((trained_adapter / "gemma_stack_adapter.json").read_text())
    assert config["peft_type"] == "LORA"
    assert manifest["format"] == "gemma-stack-adapter/1"
    assert manifest["name"] == "zorblax"
    # the tied 262k embedding is not trained: neither saved as a module nor targeted
    assert not config["modules_to_save"]
    assert "lm_head" not in config["target_modules"]
    assert "embed_tokens" not in config["target_modules"]

    weights = manifest["base_model"]["weights"]
    assert (
        len(weights["digest"]) == 64 and weights["files"]["model.safetensors"] == weights["digest"]
    )
    assert manifest["tokenizer"]["bos_token_id"] == 2
    assert 106 in manifest["tokenizer"]["stop_token_ids"]  # <end_of_turn>
    assert manifest["data"]["train"]["examples"] == 96
    assert manifest["metrics"]["steps"] > 0
    assert manifest["metrics"]["eval_loss"] < 0.5
    assert manifest["config"]["lora"]["r"] == 8
