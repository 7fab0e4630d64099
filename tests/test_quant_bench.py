"""`quant bench`'s protocol: the windows score every text token once, BOS first; a llama.cpp row
asked for without llama.cpp installed says how to install it (llama.cpp is a benchmark reference,
built by benchmarks/install_llamacpp.sh, not a dependency the suite installs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quant.bench import LLAMA_CPP, Protocol, _llamacpp_row, windows


def test_windows_score_each_text_token_once_with_bos_first():
    ids = list(range(100, 1100))
    protocol = Protocol(window=64, stride=48, windows=5)
    batches = windows(ids, bos=2, protocol=protocol)

    scored = []
    for index, (batch, skip) in enumerate(batches):
        assert batch.shape == (1, 64)
        assert batch[0, 0].item() == 2
        body = batch[0, 1:].tolist()
        assert body == ids[index * 48 : index * 48 + 63]
        scored += body[skip:]
    assert scored == ids[: len(scored)], "a token scored twice or skipped"
    assert batches[1][1] == 63 - 48, "a later window re-reads its overlap as context only"


def test_windows_refuse_a_text_too_short():
    with pytest.raises(ValueError, match="windows=5"):
        windows(list(range(100)), bos=2, protocol=Protocol(window=64, stride=48, windows=5))


def test_llama_cpp_level_without_llama_cpp_names_the_install(tmp_path: Path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(FileNotFoundError, match="install_llamacpp.sh") as error:
        _llamacpp_row("gemma-3-270m", [], [], 1.0, Protocol(), missing)
    assert LLAMA_CPP in str(error.value) and str(missing) in str(error.value)


def test_llama_cpp_level_with_an_unknown_format_names_the_choices(tmp_path: Path):
    python = tmp_path / "python"
    python.touch()
    with pytest.raises(ValueError, match="Q4_0, Q4_1") as error:
        _llamacpp_row("gemma-3-270m", [], [], 1.0, Protocol(), python, "Q2_K")
    assert "llama.cpp:Q2_K" in str(error.value)


def test_levels_are_checked_before_anything_loads():
    from quant.bench import LevelError, check_levels, parse_level

    check_levels(["bf16", "8", "4", "4:bnb", "3:hqq", "4-tied", "bf16+head", "gguf", "llama.cpp"])
    check_levels(["llama.cpp:Q4_0", "llama.cpp:Q4_1"])
    assert parse_level("4:bnb-tied") == (4, "bnb", False)
    assert parse_level("3") == (3, None, None)
    with pytest.raises(LevelError) as error:
        check_levels(["bf16", "4:foo", "5", "3:bnb", "4:", "llama.cpp:Q2_K"])
    problems = str(error.value).splitlines()
    assert len(problems) == 5  # every bad entry at once, each naming itself and the choices
    assert "'4:foo'" in problems[0] and "gptq, bnb, hqq" in problems[0]
    assert "'5'" in problems[1] and "bf16, 8, 4, 3" in problems[1]
    assert "'3:bnb'" in problems[2] and "gptq, hqq" in problems[2]
    assert "'4:'" in problems[3]
    assert "'llama.cpp:Q2_K'" in problems[4] and "Q4_0, Q4_1" in problems[4]


def test_a_missing_llama_cpp_is_found_before_the_reference_loads(tmp_path: Path):
    from quant.bench import LevelError, run

    missing = tmp_path / "no-venv" / "bin" / "python"
    # A model name that resolves to nothing: had the bench loaded its reference first, this would
    # be a model-not-found error instead.
    with pytest.raises(LevelError, match="install_llamacpp.sh"):
        run("no-such-model-is-ever-loaded", ["bf16", "llama.cpp:Q4_0"], Protocol(), missing)
