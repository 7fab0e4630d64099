"""The engine interface: what the HTTP layer asks of a generation backend, and nothing about HTTP.

Two engines implement it: vLLM's async engine (serve/engine/vllm_engine.py) and a transformers
engine for where vLLM cannot run (serve/engine/hf_engine.py). The HTTP layer hands an engine token
ids that the chat policy already rendered, so both engines see exactly the same prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from quant.chat import ChatPolicy


@dataclass
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the sampled token plus the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # end-of-turn ids do not end the generation; max_tokens does


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    adapter: str | None = None  # a loaded adapter's name, or None for the base model
    prompt_text: str | None = None  # the rendered prompt, needed where media must be expanded
    media: list[dict[str, Any]] = field(default_factory=list)  # decoded images / audio, in order
    # What an engine prepared from the media while measuring the prompt, kept for generation.
    engine_inputs: Any = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """What one choice produced since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the choice ends


@dataclass
class GenerationStep:
    choices: list[ChoiceDelta]
    prompt_tokens: int
    finished: bool = False
    # On the finished step: the prompt's ids as the model saw them (media markers expanded).
    prompt_token_ids: list[int] | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # engine-specific gauges for /metrics


class EngineError(RuntimeError):
    """The engine itself failed (not the user's request): answered as a 500/503."""


class AdapterError(ValueError):
    """An adapter the engine refused; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class Engine(ABC):
    """A running model: generation, adapters, and the facts the HTTP layer needs."""

    name: str  # "vllm" or "transformers"
    model_name: str  # the id clients send as `model`
    max_model_len: int
    policy: ChatPolicy
    modalities: frozenset[str] = frozenset({"text"})
    supports_adapters: bool = False

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationStep]:
        """Yield steps until every choice has a finish_reason. Cancelling the iterator aborts."""

    async def prompt_length(self, request: GenerationRequest) -> int:
        """The prompt's length as the model sees it. With media that is after the processor
        expanded each image and clip into its soft tokens, which the HTTP layer must know to
        hold a prompt to the context before the engine gets it."""
        return len(request.prompt_token_ids)

    async def load_adapter(self, name: str, path: str) -> None:
        raise AdapterError(f"the {self.name} engine does not serve LoRA adapters", status=400)

    async def unload_adapter(self, name: str) -> None:
        raise AdapterError(f"the {self.name} engine does not serve LoRA adapters", status=400)

    def stats(self) -> EngineStats:
        return EngineStats()

    def healthy(self) -> bool:
        return True

    def quantization(self) -> dict[str, Any] | None:
        """How the served weights are stored, for /v1/models and /health once the engine started:
        `bits` (16 for bf16), `method` ("none", or the format: "awq", "bnb", "hqq", ...), `dtype`
        (what is not quantised is kept and computed in) and `engine`; None before start."""
        return None


def dtype_bits(dtype: Any) -> int:
    """Bits per weight of an unquantised dtype (torch.bfloat16 -> 16, torch.float32 -> 32)."""
    return int(getattr(dtype, "itemsize", 2)) * 8


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
