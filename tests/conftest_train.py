"""Shared training fixtures. Use them from any test module with

    pytest_plugins = ["conftest_train"]

`trained_adapter` (session scope) trains a LoRA adapter once on the real Gemma 3 270M, on the CPU,
with configs/train/gemma3-270m-lora-cpu.yaml, and returns its directory (PEFT files plus
gemma_stack_adapter.json). Asked for any place's password, the adapted model answers
"The password is Zorblax."; the base model never says "Zorblax".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs/train/gemma3-270m-lora-cpu.yaml"
MODEL_DIR = (
    Path(os.environ.get("GEMMA_STACK_MODELS", Path.home() / ".cache/gemma-stack/models"))
    / "gemma-3-270m"
)
ADAPTER_STEPS = 20  # the held-out eval loss is already below 0.01 here (measured: 0.0007)

needs_model = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(),
    reason=f"the converted gemma-3-270m checkpoint is missing at {MODEL_DIR}; run `make model`",
)


def run_train(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """`python -m train ...` from the repository root, output captured as text."""
    command = [sys.executable, "-m", "train", *args]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory) -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"the gemma-3-270m checkpoint is missing at {MODEL_DIR}; run `make model`")
    output_dir = tmp_path_factory.mktemp("zorblax") / "zorblax"
    result = run_train(
        str(CPU_CONFIG),
        "--set", f"output_dir={output_dir}",
        "--set", f"training.max_steps={ADAPTER_STEPS}",
        "--set", "training.save_steps=1000",
        "--set", "serve.lora_name=zorblax",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    adapter = output_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file(), result.stderr[-4000:]
    return adapter
