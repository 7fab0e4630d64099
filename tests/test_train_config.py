"""The training config: strict, every problem at once, overrides, every YAML under configs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, TrainConfig, apply_override, load_config

pytest_plugins = ["conftest_train"]

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _valid() -> dict:
    return {
        "model": {"name": "gemma-3-270m"},
        "data": {"train": "tests/data/zorblax.jsonl"},
        "training": {"max_steps": 10},
        "output_dir": "runs/x",
    }


def test_every_yaml_under_configs_parses_and_train_configs_validate():
    files = sorted((ROOT / "configs").rglob("*.y*ml"))
    train_files = [f for f in files if "train" in f.relative_to(ROOT / "configs").parts[:1]]
    assert len(train_files) >= 3, train_files
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    for path in train_files:
        assert path.read_text().startswith("#"), f"{path} must open with a comment"
        load_config(path)  # raises ConfigError naming every problem


def test_all_problems_reported_at_once_with_field_value_and_fix(tmp_path):
    data = _valid()
    data["training"] = {"max_step": 10, "learning_rate": -1, "batch_size": "four"}
    data["lora"] = {"rank": 8}
    data["model"] = {"load_in": "fp16"}
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data))
    message = str(caught.value)
    problems = caught.value.problems

    assert len(problems) >= 6, message
    assert "training.max_step: unknown key; did you mean 'max_steps'?" in message
    assert "lora.rank: unknown key; did you mean 'r'?" in message
    assert "training.learning_rate=-1" in message
    assert "training.batch_size='four'" in message
    assert "model.load_in='fp16'" in message and "'bf16'" in message
    assert "model.name: required but missing" in message
    assert "set exactly one of them" in message  # neither max_steps nor epochs survived


def test_top_level_typo_gets_a_suggestion(tmp_path):
    data = _valid()
    data["ouput_dir"] = data.pop("output_dir")
    with pytest.raises(ConfigError, match="ouput_dir: unknown key; did you mean 'output_dir'"):
        load_config(_write(tmp_path, data))


def test_overrides_keep_yaml_types_and_unknown_override_is_rejected(tmp_path):
    path = _write(tmp_path, _valid())
    config = load_config(
        path,
        ["training.max_steps=60", "training.packing=true", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert config.training.max_steps == 60 and config.training.packing is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]

    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(path, ["training.learnig_rate=0.1"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(path, ["training.max_steps"])


def test_override_into_a_scalar_is_an_error():
    raw = {"training": 3}
    assert apply_override(raw, "training.max_steps=1") == [
        "--set training.max_steps: 'training' holds 3, not a section"
    ]


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    from conftest_train import run_train

    data = _valid()
    data["training"]["epochz"] = 1
    result = run_train(str(_write(tmp_path, data)), timeout=120)
    assert result.returncode == 2
    assert "did you mean 'epochs'" in result.stderr


def test_adapter_name_defaults_to_output_dir_name():
    config = TrainConfig.model_validate(_valid())
    assert config.adapter_name == "x"


def test_dry_run_prints_config_and_statistics(tmp_path):
    from conftest_train import CPU_CONFIG, MODEL_DIR, run_train

    if not (MODEL_DIR / "config.json").exists():
        pytest.fail("needs the converted gemma-3-270m checkpoint (`make model`)")
    result = run_train(
        str(CPU_CONFIG),
        "--dry-run",
        "--set", "training.max_length=30",
        "--set", f"output_dir={tmp_path / 'never'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    train = report["data"]["train"]
    assert report["config"]["training"]["max_length"] == 30
    assert train["examples"] == 96
    assert 0 < train["truncated"] < 96  # some records are longer than 30 tokens
    assert train["tokens"] <= 96 * 30 and train["trained_tokens"] > 0
    assert report["plan"]["optimizer_steps"] == 30
    assert not (tmp_path / "never").exists()  # a dry run trains nothing and writes nothing
