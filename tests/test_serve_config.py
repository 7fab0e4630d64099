"""The server's settings: YAML files, flags over YAML, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.config import ConfigError, load_config, parse_args
from serve.engine import ParallelismError, check_parallelism, choose_engine

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = sorted((REPO / "configs" / "serve").rglob("*.yaml"))


def test_every_yaml_under_configs_parses():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_is_valid(path):
    config = load_config(path, {})
    assert config.model
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} must open with a comment saying what it does"


def test_flags_override_yaml():
    config = parse_args(
        [
            "--config",
            str(REPO / "configs/serve/gemma3-270m-cpu.yaml"),
            "--port",
            "9123",
            "--no-metrics-public",
        ]
    )
    assert config.port == 9123
    assert config.max_model_len == 32768
    assert config.metrics_public is False


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle: gemma-3-270m\nport: 99999\nbits: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "did you mean 'model'" in message
    assert "port" in message and "99999" in message
    assert "bits" in message


def test_adapters_dir_turns_lora_on(tmp_path):
    assert load_config(None, {"adapters_dir": str(tmp_path)}).enable_lora


def test_parallel_settings_are_checked_against_the_machine():
    config = load_config(REPO / "configs/serve/gemma4-moe-tp2-cuda.yaml", {})
    with pytest.raises(ParallelismError, match="needs 2 GPUs, and this machine has none"):
        check_parallelism(config, gpus=0)
    with pytest.raises(ParallelismError, match="need 2 GPUs and this machine has 1"):
        check_parallelism(config, gpus=1)
    check_parallelism(config, gpus=2)
    check_parallelism(load_config(None, {}), gpus=0)


def test_four_bits_go_to_vllm_where_the_model_exports_and_the_rest_to_transformers():
    from quant.resolve import resolve_model
    from tests.test_media import tiny_checkpoint

    real = resolve_model("gemma-3-270m").path
    engine, reason = choose_engine(load_config(None, {"bits": 4}), real)
    assert engine == "vllm" and "AWQ export" in reason and "head" in reason
    assert choose_engine(load_config(None, {}), real)[0] == "vllm"
    # 8 and 3 bits, and the transformers engine's own methods, stay with transformers.
    engine, reason = choose_engine(load_config(None, {"bits": 8}), real)
    assert engine == "transformers" and "8-bit" in reason
    engine, reason = choose_engine(load_config(None, {"bits": 4, "quant_method": "hqq"}), real)
    assert engine == "transformers" and "quant_method=hqq" in reason
    # Checkpoints the export does not cover fall back, with the reason.
    engine, reason = choose_engine(
        load_config(None, {"bits": 4}), tiny_checkpoint("gemma3-vision")
    )  # fmt: skip
    assert engine == "transformers" and "vision tower" in reason
    engine, reason = choose_engine(load_config(None, {"bits": 4}), tiny_checkpoint("gemma4-moe"))
    assert engine == "transformers" and "mixture-of-experts" in reason
    # Asking for vLLM where it cannot serve the level is an error, not a silent bf16 server.
    with pytest.raises(RuntimeError, match="vLLM cannot serve bits=8"):
        choose_engine(load_config(None, {"bits": 8, "engine": "vllm"}), real)
    with pytest.raises(ConfigError, match="quant_method=awq is a 4-bit export"):
        load_config(None, {"bits": 8, "quant_method": "awq"})


def test_a_busy_port_is_refused_before_the_engine_starts():
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "serve", "--port", str(port)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr
    assert "engine" not in done.stderr.lower()  # refused before any engine work


def test_quant_methods_are_the_loaders():
    """The config names exactly the methods quant.load takes per level, plus the vLLM export."""
    from quant.loader import METHODS
    from serve.config import QUANT_METHODS

    for bits, methods in METHODS.items():
        if bits < 16:
            assert set(QUANT_METHODS[bits]) - {"awq"} == set(methods), bits


def test_quant_method_named_by_its_library_and_wrong_pairs_refused():
    assert load_config(None, {"bits": 4, "quant_method": "bitsandbytes"}).quant_method == "bnb"
    with pytest.raises(
        ConfigError, match=r"quant_method=.bnb. does not serve bits=3: use one of gptq, hqq"
    ):
        load_config(None, {"bits": 3, "quant_method": "bnb"})
    with pytest.raises(ConfigError, match=r"quant_method='torchao'.*one of bnb, hqq"):
        load_config(None, {"bits": 8, "quant_method": "torchao"})
    with pytest.raises(ConfigError, match=r"bits=16: use no quant_method"):
        load_config(None, {"quant_method": "hqq"})
