"""The server's settings: one typed model, filled from a YAML file and then from flags.

    python -m serve --config configs/serve/gemma3-270m-cpu.yaml --port 9000

Every flag is also a YAML key (dashes become underscores); flags win. Unknown keys and bad values
are all reported in one error, each with the field, the value and the fix.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# quant_method per bits: the 4-bit vLLM export, and quant.loader's METHODS for the transformers
# engine (spelled out here so reading a config does not import torch; a test keeps them equal).
QUANT_METHODS = {8: ("bnb", "hqq"), 4: ("awq", "gptq", "bnb", "hqq"), 3: ("gptq", "hqq")}


class ConfigError(ValueError):
    """Every problem with a configuration, one per line."""


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What to serve
    model: str = Field(
        "gemma-3-270m", description="a known name, checkpoint dir, GGUF file or HF id"
    )
    served_model_name: str | None = Field(None, description="the id clients send (default: model)")
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    bits: int = Field(16, description="16 (bf16), 8, 4 or 3")
    quant_method: str | None = Field(
        None,
        description="bits < 16: awq (vLLM serves a 4-bit export; the default at 4 bits where vLLM "
        "runs), or gptq (4, 3), bnb (bitsandbytes; 8, 4) or hqq (8, 4, 3) on the transformers "
        "engine",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="context length (default: model's)")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="load pickled .bin weights (unsafe)")

    # Where to listen and who may call
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="required as a Bearer token on /v1/*")
    metrics_public: bool = Field(True, description="serve /metrics without the API key")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Load limits
    max_pending: int = Field(256, ge=1, description="requests in flight before 503 + Retry-After")
    max_body_mb: float = Field(8.0, gt=0, description="largest request body accepted")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM's batch size")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vLLM: tokens per step, i.e. the prefill chunk (default: vLLM's)"
    )
    enforce_eager: bool = Field(False, description="vLLM: skip torch.compile (quicker start)")
    drain_seconds: float = Field(30.0, ge=0, description="how long SIGTERM waits for requests")

    # Adapters
    adapters_dir: Path | None = Field(None, description="LoRA adapters loaded from here only")
    enable_lora: bool = False
    max_lora_rank: int = Field(64, ge=1, le=512)
    max_loras: int = Field(4, ge=1)
    watch_interval: float = Field(2.0, gt=0, description="seconds between adapters_dir scans")

    # Media
    allowed_media_dir: Path | None = None
    allowed_media_domains: list[str] = Field(default_factory=list)
    max_media_mb: float = Field(10.0, gt=0)
    media_timeout: float = Field(10.0, gt=0)
    max_images: int = Field(4, ge=0)
    max_audios: int = Field(4, ge=0)

    # vLLM parallelism, passed through as vLLM defines it
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray"] | None = None

    # vLLM's CPU build (ignored elsewhere)
    cpu_kv_cache_gib: int = Field(2, ge=1, description="GiB of KV cache (vLLM CPU build)")
    cpu_threads_bind: str = Field("all", description="'all', 'auto' (vLLM's) or e.g. '0-1'")
    cpu_reserved: int = Field(0, ge=0)
    cpu_int4_w4a8: bool = Field(
        True,
        description="vLLM CPU build, 4-bit, AMX CPUs: int8 activations in the int4 kernel (fast, "
        "vLLM's default); off: bf16 activations, exact to the 4-bit weights, no faster than bf16",
    )

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, bits: int) -> int:
        if bits not in (16, 8, 4, 3):
            raise ValueError("must be 16 (bf16), 8, 4 or 3")
        return bits

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.adapters_dir is not None:
            self.__dict__["enable_lora"] = True
        if self.quant_method == "awq" and (self.bits != 4 or self.engine == "transformers"):
            raise ValueError(
                "quant_method=awq is a 4-bit export that vLLM serves: use it with bits=4 and "
                "engine auto or vllm"
            )
        if self.quant_method == "bitsandbytes":
            self.__dict__["quant_method"] = "bnb"  # the library's name, accepted for the loader's
        methods = QUANT_METHODS.get(self.bits, ())
        if self.quant_method is not None and self.quant_method not in methods:
            fix = f"one of {', '.join(methods)}" if methods else "no quant_method (bf16)"
            raise ValueError(
                f"quant_method={self.quant_method!r} does not serve bits={self.bits}: use {fix}, "
                "or leave it out to let the server choose"
            )
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or _default_name(self.model)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolved_threads_bind(self) -> str | None:
        if self.cpu_threads_bind == "auto":
            return None
        if self.cpu_threads_bind == "all":
            return f"0-{(os.cpu_count() or 1) - 1}"
        return self.cpu_threads_bind


def _default_name(model: str) -> str:
    path = Path(model)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else model


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """YAML first, then flags; all problems reported at once."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"config={str(path)!r} cannot be read: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path} must hold a mapping of settings, not {type(loaded).__name__}"
            )
        values.update(loaded)
    values.update({key: value for key, value in overrides.items() if value is not None})

    known = set(ServeConfig.model_fields)
    for key in sorted(set(values) - known):
        hint = difflib.get_close_matches(key, known, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "see `python -m serve --help`"
        problems.append(f"{key}: unknown setting (value {values[key]!r}); {fix}")

    try:
        config = ServeConfig(**{k: v for k, v in values.items() if k in known})
    except ValidationError as error:
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"]) or "config"
            value = item.get("input")
            problems.append(f"{field}: {item['msg']} (got {value!r})")
        config = None

    if problems:
        source = f" in {path}" if path else ""
        raise ConfigError(
            f"{len(problems)} problem(s) with the server settings{source}:\n  - "
            + "\n  - ".join(problems)
        )
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="OpenAI-compatible server for Gemma models (vLLM, or transformers).",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    for name, field in ServeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=_help(field)
            )
        elif name == "allowed_media_domains":
            parser.add_argument(flag, nargs="*", default=None, help="domains media may come from")
        else:
            parser.add_argument(flag, default=None, help=_help(field))
    return parser


def _help(field) -> str:
    """The field's description with its allowed values and default, for --help."""
    parts = [field.description] if field.description else []
    choices = getattr(field.annotation, "__args__", None)
    if choices and all(isinstance(c, str) for c in choices):
        parts.append("one of " + ", ".join(choices))
    if field.default_factory is None and field.default is not None:
        parts.append(f"default: {field.default}")
    return "; ".join(parts) or " "


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    if args.get("api_key") is None and os.environ.get("GEMMA_STACK_API_KEY"):
        args["api_key"] = os.environ["GEMMA_STACK_API_KEY"]
    return load_config(path, args)
