"""Request models for the OpenAI-compatible endpoints.

Unknown fields are accepted (clients send many we do not use) and logged at WARNING by the handler,
so a misspelt option is visible in the server log rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where a string holds a lone UTF-16 surrogate (JSON allows "\\ud800"; Unicode text does not,
    and the tokenizer cannot take it), or None."""
    if isinstance(value, str):
        return path if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}".lstrip("."))
        if where:
            return where
    return None


class _Request(_Lenient):
    """A request body: besides its schema, its text must be valid Unicode throughout."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where:
            raise ValueError(
                f"{where or 'body'} holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                "without its pair), which is not valid Unicode text; send valid text"
            )
        return data


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Lenient):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]

# An empty stop string would end every generation at once; vLLM refuses it deep in the engine.
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _GenerationRequest(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    n: int = Field(1, ge=1, le=16)
    stop: StopString | list[StopString] | None = None
    # vLLM sends these to its engine process as 64-bit ints; a larger one fails there.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # An extension vLLM's server also offers: each choice carries the ids of its generated tokens.
    return_token_ids: bool = False
    # Also vLLM's: generate max_tokens tokens whatever the model says (benchmarks need fixed work).
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class LoadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    # No NUL: the OS cannot take it in a path, and it would otherwise surface deep in os.stat.
    lora_path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")


class UnloadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)
