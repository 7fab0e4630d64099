"""quant.load on the real Gemma 3 270M: every level loads, generates text, and shrinks memory.

Each level is loaded once for the whole module (`levels`); 3-bit HQQ decodes its packed weights
per step in plain torch, so generation is kept to a few tokens.
"""

from __future__ import annotations

import pytest
import torch

import quant
from quant.device import DeviceError

MODEL = "gemma-3-270m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def levels():
    """bits -> LoadedModel, each level loaded at most once in this module."""
    cache = {}

    def get(bits):
        if bits not in cache:
            cache[bits] = quant.load(MODEL, bits=bits)
        return cache[bits]

    yield get
    cache.clear()


@pytest.fixture(scope="module", params=[16, 8, 4, 3], ids=lambda bits: f"bits{bits}")
def loaded(request, levels):
    return levels(request.param)


def test_level_generates_sensible_text(loaded):
    inputs = loaded.tokenizer(PROMPT, return_tensors="pt")
    assert inputs.input_ids[0, 0] == loaded.tokenizer.bos_token_id  # exactly one BOS, first
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits
        steps = 4 if loaded.bits == 3 else 8
        out = loaded.model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    assert not torch.isnan(logits).any()
    text = loaded.tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert sum(ch.isalpha() for ch in text) >= 3, f"bits={loaded.bits} generated {text!r}"
    if loaded.bits == 16:
        # The bf16 model knows the answer; lower levels need only produce real words.
        assert "Paris" in text or "capital" in text or "France" in text, text


def test_report_matches_level(loaded):
    report = loaded.report
    assert report.bits == loaded.bits
    if loaded.bits == 16:
        assert set(report.by_kind) <= {"bfloat16", "float32"}
        assert report.head == "tied"
        return
    kinds = {"bnb-int8": (8, 8.5), "bnb-nf4": (4, 4.6), "hqq-int3": (3, 4.0)}
    (kind,) = [k for k in report.by_kind if k in kinds]
    low, high = kinds[kind]
    count, size = report.by_kind[kind]
    assert low <= 8 * size / count <= high, f"{kind}: {8 * size / count:.2f} bits per weight"
    # the decoder's linear layers (7 per layer x 18 layers) and the output head's own copy
    assert len(report.quantised) == 7 * 18 + 1 and "lm_head" in report.quantised
    assert "lm_head" not in report.skipped
    assert report.head == "int8-rowwise" and "head=int8-rowwise" in report.render()
    count, size = report.by_kind["int8-rowwise"]
    assert count == 262144 * 640
    assert size == count + 262144 * 2  # one int8 per weight, one bf16 scale per row
    # the input embedding keeps its own bf16 table, no longer shared with the head
    model = loaded.model
    assert model.get_output_embeddings() is not model.get_input_embeddings()
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_memory_shrinks_per_level(levels):
    bf16, nf4 = levels(16).report, levels(4).report  # the loads the tests above already made
    embedding = 262144 * 640 * 2  # the input embedding stays bf16 at every level
    head = 262144 * 640 + 262144 * 2  # the int8 head copy at levels below 16
    decoder_bf16 = bf16.weight_bytes - embedding
    decoder_nf4 = nf4.weight_bytes - embedding - head
    assert bf16.parameters + 262144 * 640 == nf4.parameters  # the head is now its own weight
    # NF4 with one fp32 absmax per 64 weights: 4.5 bits against 16
    assert decoder_nf4 == pytest.approx(decoder_bf16 * 4.5 / 16, rel=0.02)


def test_float16_refused_with_reason():
    with pytest.raises(DeviceError, match="overflow float16"):
        quant.load(MODEL, dtype="float16")


def test_bad_level_and_method_name_the_fix():
    with pytest.raises(quant.LoadError, match="bits=5"):
        quant.load(MODEL, bits=5)
    with pytest.raises(quant.LoadError, match="method='bnb' does not offer bits=3"):
        quant.load(MODEL, bits=3, method="bnb")


def test_device_selection(monkeypatch):
    assert quant.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device='cuda' was asked for"):
            quant.pick_device("cuda")
        assert quant.pick_device("auto").type in ("mps", "cpu")
    with pytest.raises(DeviceError, match="device='tpu'"):
        quant.pick_device("tpu")
    # auto prefers CUDA whenever torch reports it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert quant.pick_device("auto") == torch.device("cuda")
