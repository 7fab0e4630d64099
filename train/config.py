"""The training config: one typed, strict model, loaded from YAML plus `--set key=value` overrides.

Unknown keys are rejected with a "did you mean", and every problem in a file is reported at once,
each naming the field, the value it had and what to write instead.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """One or more problems in a training config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# Names users bring from TRL, PEFT and transformers, and what they are called here.
KNOWN_ALIASES = {
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "max_seq_length": "max_length",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_steps",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(description="a model name (gemma-3-270m), checkpoint directory or .gguf file")
    load_in: Literal["bf16", "8bit", "4bit"] = "bf16"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"


class DataSection(_Section):
    train: str = Field(description="JSONL file or a `datasets` dataset saved with save_to_disk")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, gt=0, description="use only the first N examples")


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Vision and audio towers stay frozen unless asked: text data gives them no useful signal.
    include_towers: bool = False
    # Gemma 4 MoE experts are packed 3-D parameters, not nn.Linear; LoRA reaches them only through
    # PEFT's `target_parameters`, so they are a separate, explicit choice.
    target_experts: bool = False
    # The tied 262k x hidden embedding is the output head too; training it costs a full copy.
    train_embeddings: bool = False


_ONE_LENGTH = (
    "training.max_steps={steps!r} and training.epochs={epochs!r}: "
    "set exactly one of them (e.g. training.max_steps: 100)"
)


class TrainingSection(_Section):
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_length: int = Field(1024, gt=8)
    packing: bool = False
    # On, as in TRL: activations are recomputed in the backward pass, which costs about a fifth
    # of the speed and saves the memory a longer sequence or a larger model runs out of first.
    gradient_checkpointing: bool = True
    seed: int = 42
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    log_steps: int = Field(10, gt=0)
    tensorboard: bool = False

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(_ONE_LENGTH.format(steps=self.max_steps, epochs=self.epochs))
        return self


class ServeSection(_Section):
    url: str | None = Field(None, description="a running server, e.g. http://127.0.0.1:8000")
    api_key: str | None = None
    adapters_dir: str | None = Field(None, description="the server's adapters directory")
    lora_name: str | None = Field(None, description="name to register; default: output_dir's name")
    timeout_s: float = Field(120.0, gt=0)


class TrainConfig(_Section):
    model: ModelSection
    data: DataSection
    lora: LoraSection = LoraSection()
    training: TrainingSection
    output_dir: str
    serve: ServeSection = ServeSection()

    @property
    def adapter_name(self) -> str:
        return self.serve.lora_name or Path(self.output_dir).resolve().name


# -- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML, apply `key=value` overrides, validate; all problems raise one ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError([f"cannot read {path}: {error}"], str(path)) from error
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping at top level"], str(path))

    problems = [p for item in overrides for p in apply_override(raw, item)]
    return validate(raw, str(path), problems)


def validate(raw: dict[str, Any], source: str = "config", problems: list[str] = ()) -> TrainConfig:
    problems = list(problems)
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as error:
        problems += [_describe(e) for e in error.errors()]
        # Cross-field rules run only once the fields are valid; report them now as well.
        problems += [p for p in _length_problem(raw.get("training")) if p not in problems]
        config = None
    if problems:
        raise ConfigError(problems, source)
    return config


def _length_problem(training: Any) -> list[str]:
    if not isinstance(training, dict):
        return []
    steps, epochs = training.get("max_steps"), training.get("epochs")
    if (steps is None) == (epochs is None):
        return [_ONE_LENGTH.format(steps=steps, epochs=epochs)]
    return []


def apply_override(raw: dict[str, Any], item: str) -> list[str]:
    """`a.b=value`: the value is read as YAML, so `true`, `60` and `[q_proj, v_proj]` keep types."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        return [f"--set {item!r} is not key=value; write e.g. --set training.max_steps=60"]
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return [f"--set {key}: {part!r} holds {child!r}, not a section"]
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return []


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key{_did_you_mean(error['loc'])}"
    if error["type"] == "missing":
        return f"{where}: required but missing; add it ({_field_help(error['loc'])})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return message
    return f"{where}={value!r}: {message}"


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return model if part == loc[-1] else None
        if not issubclass(field.annotation, BaseModel):
            return model
        model = field.annotation
    return model


def _did_you_mean(loc: tuple) -> str:
    model = _section_for(loc)
    if model is None:
        return ""
    names = list(model.model_fields)
    alias = KNOWN_ALIASES.get(str(loc[-1]))
    close = [alias] if alias in names else difflib.get_close_matches(str(loc[-1]), names, 1, 0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid keys here: {', '.join(names)})"


def _field_help(loc: tuple) -> str:
    model = _section_for(loc)
    field = model.model_fields.get(str(loc[-1])) if model else None
    return field.description if field and field.description else "see configs/train/ for examples"
