"""Tiny random Gemma checkpoints: packed MoE experts are quantised, the router and towers are not,
and a saved quantised checkpoint reloads to the same outputs from the facts in its config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import quant
from quant.codecs import QuantLinear
from quant.moe import is_quantised_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_tiny_checkpoints import build, tiny_root  # noqa: E402

LEVELS = [(8, "bnb"), (4, "bnb"), (8, "hqq"), (4, "hqq"), (3, "hqq"), (3, "gptq")]


@pytest.fixture(scope="module")
def tiny():
    return {name: build(name, tiny_root()) for name in ("gemma4-moe", "gemma3-vision")}


def _logits(loaded):
    ids = loaded.text_tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        return loaded.model(**ids).logits


@pytest.mark.parametrize(("bits", "method"), LEVELS)
def test_moe_experts_quantised_router_not(tiny, bits, method):
    loaded = quant.load(tiny["gemma4-moe"], bits=bits, method=method)
    layers = loaded.model.model.layers
    for layer in layers:
        assert is_quantised_experts(layer.experts)
        assert "gate_up_proj" not in dict(layer.experts.named_parameters(recurse=False))
        assert type(layer.router.proj) is torch.nn.Linear  # high precision
        assert layer.router.proj.weight.dtype == torch.bfloat16
        assert layer.experts.gate_up_proj.shape == (4, 128, 64)  # decoded on access
    quantised = set(loaded.report.quantised)
    assert "model.layers.0.experts.gate_up_proj" in quantised
    assert "model.layers.1.experts.down_proj" in quantised
    assert "model.layers.0.router.proj" in loaded.report.skipped
    assert "router" in loaded.report.render()
    assert not torch.isnan(_logits(loaded)).any()
    if method == "gptq":  # attention layers by GPTQ; the experts by HQQ, and the report says so
        assert any("packed MoE experts" in note for note in loaded.report.notes)
        assert "note: HQQ's quantiser for the packed MoE experts" in loaded.report.render()


def test_quantised_experts_close_to_bf16(tiny):
    bf16 = quant.load(tiny["gemma4-moe"])
    int8 = quant.load(tiny["gemma4-moe"], bits=8, method="hqq")
    reference = bf16.model.model.layers[0].experts.gate_up_proj.float()
    decoded = int8.model.model.layers[0].experts.gate_up_proj.float()
    assert (decoded - reference).abs().max() < 0.02 * reference.abs().max()


@pytest.mark.parametrize("bits", [4, 3])
def test_vision_tower_stays_high_precision(tiny, bits):
    loaded = quant.load(tiny["gemma3-vision"], bits=bits, method="hqq" if bits == 3 else None)
    assert type(loaded.tokenizer).__name__ == "Gemma3Processor"
    vision = loaded.model.model.vision_tower
    assert not any(isinstance(m, QuantLinear) for m in vision.modules())
    assert all(p.dtype == torch.bfloat16 for p in vision.parameters())
    assert any(name.startswith("model.vision_tower") for name in loaded.report.skipped)
    assert any("language_model" in name for name in loaded.report.quantised)


@pytest.mark.parametrize(("bits", "method"), LEVELS)
@pytest.mark.parametrize("name", ["gemma4-moe", "gemma3-vision"])
def test_save_reload_same_outputs(tiny, tmp_path, name, bits, method):
    loaded = quant.load(tiny[name], bits=bits, method=method)
    before = _logits(loaded)  # a forward first: bnb repacks NF4 on the CPU at the first call
    quant.save_quantised(loaded, tmp_path / "saved")

    facts = json.loads((tmp_path / "saved" / "config.json").read_text())
    facts = facts["gemma_stack_quantization"]
    assert (facts["method"], facts["bits"], facts["group_size"]) == (method, bits, 64)
    assert facts["skipped"] and facts["quantised"]
    assert (facts["head"], facts["head_module"]) == ("int8-rowwise", "lm_head")

    renamed = tmp_path / "no-hint-in-this-name"  # facts come from config, never the name
    (tmp_path / "saved").rename(renamed)
    reloaded = quant.load(renamed)
    assert (reloaded.method, reloaded.bits) == (method, bits)
    assert torch.equal(before, _logits(reloaded))
    assert torch.equal(before, _logits(loaded))  # saving left the original model intact
    assert reloaded.report.by_kind == loaded.report.by_kind
    head = reloaded.model.get_output_embeddings()
    assert head is not reloaded.model.get_input_embeddings()  # reload did not tie it back
    assert torch.equal(head.qweight, loaded.model.get_output_embeddings().qweight)


def test_head_option_off_keeps_tied_head(tiny):
    loaded = quant.load(tiny["gemma3-vision"], bits=4, method="hqq", quantise_head=False)
    model = loaded.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert loaded.report.head == "tied" and "int8-rowwise" not in loaded.report.by_kind
    assert "tied" in loaded.report.skipped["lm_head"]


def test_builder_is_idempotent(tiny):
    path = tiny["gemma4-moe"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build("gemma4-moe", tiny_root()) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (path / "chat_template.jinja").exists() and (path / "tokenizer.json").exists()


def test_save_refuses_a_directory_holding_a_checkpoint(tiny, tmp_path):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny["gemma4-moe"], source)
    before = {path.name: path.read_bytes() for path in source.iterdir() if path.is_file()}
    loaded = quant.load(source, bits=4, method="hqq")
    for target in (source, loaded.resolved.path):  # the source's own directory, by either name
        with pytest.raises(FileExistsError, match="already holds a checkpoint"):
            quant.save_quantised(loaded, target)
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before  # untouched
    quant.save_quantised(loaded, tmp_path / "empty-dir-is-fine")


def test_float32_load_converts_and_reloads_as_float32(tiny, tmp_path):
    loaded = quant.load(tiny["gemma4-moe"], bits=4, method="gptq", dtype="float32")
    before = _logits(loaded)
    quant.save_quantised(loaded, tmp_path / "saved")
    reloaded = quant.load(tmp_path / "saved")
    assert reloaded.dtype == torch.float32
    assert torch.equal(before, _logits(reloaded))

    # A bf16 load converted afterwards runs too: the int8 head follows its buffers' dtype.
    converted = quant.load(tiny["gemma4-moe"], bits=4, method="hqq")
    converted.model.to(torch.float32)
    assert _logits(converted).dtype == torch.float32


def test_shared_embedding_says_why_it_has_no_weight(tiny):
    loaded = quant.load(tiny["gemma4-moe"], bits=4, method="HQQ")  # the library's own spelling
    embedding = loaded.model.get_input_embeddings()
    assert loaded.method == "hqq" and getattr(embedding, "weight", None) is None
    with pytest.raises(AttributeError, match="quantise_head=False"):
        embedding.weight  # noqa: B018
