"""GGUF files at every level the product promises (Q8_0, Q4_K_M, Q3_K) convert, load and generate.

Only the Q4_K_M file of Gemma 3 270M is available offline, so the other two are built from it,
once per module, by quant/gguf_requant.py:
- Q8_0: every quantised tensor is dequantised and re-encoded as Q8_0 (token_embd, already Q8_0
  in the source, is copied as it is); the F32 norm weights are kept.
- Q3_K: every tensor whose rows are a multiple of 256 values (attn_output, 1024 wide, and
  ffn_down, 2048 wide: Q4_K / Q6_K in the source) is re-encoded as Q3_K by our numpy quantiser.
  A Q3_K block covers 256 values of one row, so the tensors with 640-wide rows (attn_q/k/v,
  ffn_gate/up, token_embd) cannot be Q3_K: they fall back, as in llama.cpp's mixes, and keep the
  fallback types llama.cpp chose for them in the Q4_K_M file: Q5_0, and Q8_0 for token_embd and
  the attn_v of 9 layers. (llama.cpp's own Q3_K fallback is IQ4_NL; keeping the source's types
  means every difference from the Q4_K_M model comes from the Q3_K tensors.)
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType
from gguf.quants import dequantize, quantize

import quant
from quant.gguf_requant import quantize_q3_k, requantise
from quant.resolve import gguf_for_known, resolve_model
from tests.conftest import MODEL

Q = GGMLQuantizationType
PROMPT = "def fibonacci(n):"
UNQUANTISED = (Q.F32, Q.F16)


def _all_q8_0(name, qtype, shape):
    return qtype if qtype in UNQUANTISED else Q.Q8_0


def _q3_k_where_rows_fit(name, qtype, shape):
    if qtype in UNQUANTISED or shape[-1] % 256:
        return qtype  # see the module docstring: 640-wide rows keep Q5_0 / Q8_0
    return Q.Q3_K


BUILDS = {
    "Q8_0": (_all_q8_0, LlamaFileType.MOSTLY_Q8_0),
    # _S: llama.cpp's mix with the most Q3_K (its _M and _L give some tensors more bits)
    "Q3_K": (_q3_k_where_rows_fit, LlamaFileType.MOSTLY_Q3_K_S),
}


@pytest.fixture(scope="module")
def source():
    """The Q4_K_M file, parsed once: parsing its 262k-entry vocabulary takes many seconds."""
    return GGUFReader(gguf_for_known(MODEL))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    """level -> path of a GGUF file built from the Q4_K_M one, named like a user's file."""
    folder = tmp_path_factory.mktemp("gguf")
    return {
        level: requantise(source, folder / f"gemma-3-270m-{level.lower()}.gguf", pick, file_type)
        for level, (pick, file_type) in BUILDS.items()
    }


@pytest.fixture(scope="module")
def checkpoints(built, tmp_path_factory):
    """level -> converted checkpoint directory; Q4_K_M is the known model's own conversion
    (in the shared models directory: test_resolve.py makes and uses the same one)."""
    root = tmp_path_factory.mktemp("models")
    resolved = {level: resolve_model(str(path), root=root) for level, path in built.items()}
    for level, model in resolved.items():
        assert model.gguf == built[level] and (model.path / "model.safetensors").exists()
        assert json.loads((model.path / "gemma_stack.json").read_text())["format"] == "gguf->bf16"
    return {"Q4_K_M": resolve_model(MODEL).path} | {k: v.path for k, v in resolved.items()}


def test_q3_k_quantiser_round_trips_through_gguf_dequantize():
    rng = np.random.default_rng(0)
    # Values already on a Q3_K grid come back exactly, which pins down the byte layout: scale
    # step d, signed 6-bit sub-block scales (the block's largest is -32, as the coder puts it)
    # and 3-bit weights, each sub-block holding a -4 so that its scale is found exactly.
    d = np.float32(2.0**-10)
    scales = rng.integers(-31, 32, size=(8, 16)).astype(np.float32)
    scales[:, 0] = -32
    q = rng.integers(-4, 4, size=(8, 16, 16)).astype(np.float32)
    q[:, :, 3] = -4
    exact = (d * scales[:, :, None] * q).reshape(2, 1024)
    assert np.array_equal(dequantize(quantize_q3_k(exact), Q.Q3_K), exact)

    # Gaussian weights: the error of a 3-bit grid (about 16% RMS), above 4-bit Q4_0's (about 9%)
    # but not far above it; gguf decodes the same values our packing meant.
    x = rng.standard_normal((32, 2048)).astype(np.float32)
    x[0, :256] = 0  # an all-zero block stays zero
    x[1, :256] *= 1000  # and one block's scale does not spill into its neighbours
    packed = quantize_q3_k(x)
    assert packed.shape == (32, 2048 // 256 * 110) and packed.dtype == np.uint8
    back = dequantize(packed, Q.Q3_K)
    assert np.all(back[0, :256] == 0)

    def rel_rms(a, b):
        return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))

    assert 0.1 < rel_rms(back, x) < 0.2
    assert rel_rms(back[1, :256], x[1, :256]) < 0.2 and rel_rms(back[1, 256:], x[1, 256:]) < 0.2
    q4_0 = rel_rms(dequantize(quantize(x, Q.Q4_0), Q.Q4_0), x)
    assert q4_0 < rel_rms(back, x) < 2.5 * q4_0
    # at most 8 distinct values in each sub-block of 16
    assert max(len(np.unique(sub)) for sub in back.reshape(-1, 16)) <= 8


def test_built_files_copy_the_metadata_with_its_types(source, built):
    expected = {
        "Q8_0": Counter({Q.F32: 109, Q.Q8_0: 127}),
        "Q3_K": Counter({Q.F32: 109, Q.Q5_0: 81, Q.Q3_K: 36, Q.Q8_0: 10}),
    }
    for level, path in built.items():
        reader = GGUFReader(path)
        assert Counter(t.tensor_type for t in reader.tensors) == expected[level], level
        shapes = {t.name: t.shape.tolist() for t in reader.tensors}
        assert shapes == {t.name: t.shape.tolist() for t in source.tensors}

        assert reader.fields.keys() == source.fields.keys()
        for name, field in source.fields.items():
            copy = reader.fields[name]
            assert copy.types == field.types, name  # an INT32 array stays INT32, strings stay
            if name == "general.file_type":
                assert copy.contents() == BUILDS[level][1]
            elif field.types[-1] == GGUFValueType.STRING or len(field.data) > 1000:
                # compare raw bytes: fast for the 262k-entry vocabulary, exact for strings
                assert b"".join(copy.parts[i].tobytes() for i in copy.data) == b"".join(
                    field.parts[i].tobytes() for i in field.data
                ), name
            else:
                assert copy.contents() == field.contents(), name


# Q4_K_M itself is converted by test_resolve.py and generates in test_quant_loader.py.
@pytest.mark.parametrize("level", ["Q8_0", "Q3_K"])
def test_level_converts_loads_and_generates(checkpoints, level):
    loaded = quant.load(checkpoints[level], bits=16)
    tokenizer = loaded.tokenizer
    inputs = tokenizer(PROMPT, return_tensors="pt")
    ids = inputs.input_ids[0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits
        out = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert not torch.isnan(logits).any()
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"{level}: {text!r}")  # shown by pytest -rP: how each level writes the function
    assert sum(ch.isalpha() for ch in text) >= 3, f"{level} generated {text!r}"
    if level == "Q8_0":
        # Q8_0 is within 1% of the Q4_K_M weights and writes the same body. Q3_K's 3-bit
        # tensors change the greedy path (today a docstring ending in ':return:'), so only
        # real words are asked of it, as of the low levels in test_quant_loader.py.
        assert "return" in text, f"{level} generated {text!r}"


def test_q8_0_weights_are_q8_0_of_the_q4_k_m_weights(checkpoints):
    from safetensors.torch import load_file

    reference = load_file(checkpoints["Q4_K_M"] / "model.safetensors")
    converted = load_file(checkpoints["Q8_0"] / "model.safetensors")
    assert converted.keys() == reference.keys()
    worst = {}
    for name, want in reference.items():
        want, got = want.float(), converted[name].float()
        # Q8_0 moves a value by at most half a step of its block (max|block| / 127), and each
        # side is rounded to bf16 (2**-9 relative): so within 1% of the tensor's largest value.
        worst[name] = float((got - want).abs().max() / want.abs().max())
    assert max(worst.values()) < 0.01, max(worst.items(), key=lambda item: item[1])
    # and a real re-encoding: the 117 tensors that were Q4_K, Q5_0 or Q6_K all move (Q8_0 ones
    # come back as they were: Q8_0 of Q8_0 values is exact)
    assert sum(value > 0 for value in worst.values()) == 117
