"""Text-only LoRA training of a Gemma 3 image-text class (Gemma3ForConditionalGeneration), on a
tiny random checkpoint built here from a config (no download): token_type_ids are supplied, the
vision tower is left alone, and the run writes an adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

pytest_plugins = ["conftest_train"]


@pytest.fixture(scope="module")
def tiny_image_text(tmp_path_factory):
    from conftest_train import MODEL_DIR
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    if not (MODEL_DIR / "config.json").exists():
        pytest.fail("borrows the gemma-3-270m tokenizer (`make model`)")
    config = Gemma3Config(
        text_config={"vocab_size": 262208, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 16, "sliding_window": 16, "layer_types": None},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny") / "gemma3-image-text"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):  # fmt: skip
        shutil.copy(MODEL_DIR / name, path / name)
    return path, model


def test_batches_for_image_text_classes_carry_text_token_type_ids():
    from train import batching
    from train.data import Example

    rows = batching.unpacked([Example([2, 5, 6], [0, 1, 1])])
    batch = batching.Collator(0, token_type_ids=True)([rows[0]])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0]]  # 0 = text token
    assert "token_type_ids" not in batching.Collator(0, token_type_ids=False)([rows[0]])


def test_text_only_training_of_image_text_model(tiny_image_text, tmp_path):
    from train.config import validate
    from train.run import train

    path, _ = tiny_image_text
    config = validate({
        "model": {"name": str(path), "device": "cpu"},
        "data": {"train": "tests/data/zorblax.jsonl", "max_examples": 8},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 2, "max_length": 48, "save_steps": 100},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    result = train(config)

    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "vision_tower" in adapter_config["target_modules"]  # excluded by a path regex
    assert result.manifest["base_model"]["architecture"] == "Gemma3ForConditionalGeneration"
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and any("language_model" in n for n in names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names), names
    assert result.manifest["metrics"]["steps"] == 2
