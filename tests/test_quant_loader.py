"""quant.load on the real Gemma 3 270M: every level loads, generates text, and shrinks memory."""

from __future__ import annotations

import pytest
import torch

import quant
from quant.device import DeviceError

MODEL = "gemma-3-270m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=[16, 8, 4, 3], ids=lambda bits: f"bits{bits}")
def loaded(request):
    return quant.load(MODEL, bits=request.param)


@pytest.fixture(scope="module")
def reports():
    return {}


def test_level_generates_sensible_text(loaded, reports):
    reports[loaded.bits] = loaded.report
    inputs = loaded.tokenizer(PROMPT, return_tensors="pt")
    assert inputs.input_ids[0, 0] == loaded.tokenizer.bos_token_id  # exactly one BOS, first
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits
        # 3-bit HQQ decodes its packed weights per step in plain torch: slow, so fewer tokens
        steps = 6 if loaded.bits == 3 else 16
        out = loaded.model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    assert not torch.isnan(logits).any()
    text = loaded.tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) >= 5, f"bits={loaded.bits} generated {text!r}"
    assert sum(ch.isalpha() for ch in text) >= 4, f"bits={loaded.bits} generated {text!r}"
    if loaded.bits == 16:
        # The bf16 model knows the answer; lower levels need only produce real words.
        assert "Paris" in text or "capital" in text or "France" in text, text


def test_report_matches_level(loaded):
    report = loaded.report
    assert report.bits == loaded.bits
    if loaded.bits == 16:
        assert set(report.by_kind) <= {"bfloat16", "float32"}
        return
    kinds = {"bnb-int8": (8, 8.5), "bnb-nf4": (4, 4.6), "hqq-int3": (3, 4.0)}
    (kind,) = [k for k in report.by_kind if k in kinds]
    low, high = kinds[kind]
    count, size = report.by_kind[kind]
    assert low <= 8 * size / count <= high, f"{kind}: {8 * size / count:.2f} bits per weight"
    # the decoder's linear layers: 7 per layer x 18 layers
    assert len(report.quantised) == 7 * 18
    assert "lm_head" in report.skipped and "tied" in report.skipped["lm_head"]
    assert "kept high precision: lm_head" in report.render()


def test_memory_shrinks_per_level():
    sizes = {bits: quant.load(MODEL, bits=bits).report for bits in (16, 4)}
    bf16, nf4 = sizes[16], sizes[4]
    embedding = 262144 * 640 * 2  # the tied embedding/head stays bf16 at every level
    decoder_bf16 = bf16.weight_bytes - embedding
    decoder_nf4 = nf4.weight_bytes - embedding
    assert bf16.parameters == nf4.parameters
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
