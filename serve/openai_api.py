"""The OpenAI endpoints: request -> chat policy -> engine -> response body or SSE stream.

Everything here is HTTP-shaped; generation itself belongs to the engine. One request may fan out
into several engine requests (a list of prompts), each with `n` choices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.engine.base import Engine, GenerationRequest, GenerationStep, SamplingOptions
from serve.errors import APIError, error_body, to_api_error
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIService:
    def __init__(
        self, engine: Engine, metrics: Metrics, max_pending: int, media=None, adapters=None
    ):
        self.engine = engine
        self.metrics = metrics
        self.max_pending = max_pending
        self.media = media  # serve.media.MediaLoader, or None where media is not configured
        self.adapters = adapters  # serve.adapters.AdapterRegistry, or None without adapters_dir
        self.in_flight = 0

    # -- models ---------------------------------------------------------------------------------

    def list_models(self) -> dict:
        created = int(time.time())
        base = self.engine.model_name
        # Beyond OpenAI's fields (its clients ignore the rest): how the base weights are served.
        # An adapter runs on those same weights (its own LoRA weights are not quantised), so it
        # carries its base's level.
        quantization = self.engine.quantization()
        data = [
            {
                "id": base,
                "object": "model",
                "created": created,
                "owned_by": "gemma-stack",
                "root": base,
                "parent": None,
                "max_model_len": self.engine.max_model_len,
                "quantization": quantization,
            }
        ]
        for name in self._served_adapters():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "gemma-stack",
                    "root": base,
                    "parent": base,
                    "quantization": quantization,
                }
            )
        return {"object": "list", "data": data}

    def _served_adapters(self) -> dict[str, str]:
        """Client-visible adapter name -> the engine's name for it.

        The registry loads each adapter under a private engine name and shows it only once it
        passed its checks, so a client never selects one that is still being validated."""
        if self.adapters is not None:
            return self.adapters.served()
        return {name: name for name in getattr(self.engine, "adapter_names", lambda: [])()}

    def _adapter_for(self, model: str) -> str | None:
        if model == self.engine.model_name:
            return None
        served = self._served_adapters()
        if model in served:
            return served[model]
        raise APIError(
            404,
            f"The model {model!r} does not exist on this server; GET /v1/models lists what it "
            f"serves ({self.engine.model_name!r} and any loaded adapters).",
            param="model",
            code="model_not_found",
        )

    # -- entry points ---------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request):
        _warn_unknown(body, request.url.path)
        adapter = self._adapter_for(body.model)
        if body.tools and not self.engine.policy.has_tool_format:
            raise APIError(
                400,
                "this model's chat template has no tool format, so `tools` "
                "cannot be offered to it; remove `tools`",
                param="tools",
            )

        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        rendered = self.engine.policy.render(messages)
        media = await self._media(rendered.media)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        engine_request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_token_ids=rendered.token_ids,
            sampling=SamplingOptions(max_tokens=1),  # replaced below, once the length is known
            adapter=adapter,
            prompt_text=rendered.text,
            media=media,
        )
        # Each image or clip becomes many tokens only in the processor, so the context limit is
        # checked against the expanded length, not the rendered markers.
        prompt_len = await self.engine.prompt_length(engine_request)
        engine_request.sampling = self._sampling(
            body, prompt_len, max_tokens, top_logprobs, "messages", with_media=bool(media)
        )
        return await self._respond(body, [engine_request], chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        _warn_unknown(body, request.url.path)
        adapter = self._adapter_for(body.model)
        prompts = _prompt_list(body.prompt)
        engine_requests = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                self._check_token_ids(prompt, index if len(prompts) > 1 else None)
            prompt_ids = self.engine.policy.encode_prompt(prompt)
            sampling = self._sampling(
                body, len(prompt_ids), body.max_tokens or 16, body.logprobs, "prompt"
            )
            engine_requests.append(
                GenerationRequest(
                    request_id=f"cmpl-{uuid.uuid4().hex}",
                    prompt_token_ids=prompt_ids,
                    sampling=sampling,
                    adapter=adapter,
                )
            )
        echo = (
            [p if isinstance(p, str) else self.engine.policy.tokenizer.decode(p) for p in prompts]
            if body.echo
            else None
        )
        return await self._respond(body, engine_requests, chat=False, echo=echo)

    async def _media(self, parts: list[dict]) -> list[dict]:
        if not parts:
            return []
        for part in parts:
            if part["type"] not in self.engine.modalities:
                raise APIError(
                    400,
                    f"{part['where']} is {part['type']} input, but the model "
                    f"{self.engine.model_name!r} does not accept {part['type']}s "
                    f"(it accepts: {', '.join(sorted(self.engine.modalities))})",
                    param=part["where"],
                    code="unsupported_modality",
                )
        if self.media is None:
            raise APIError(400, "this server was started without media support", param="messages")
        return await self.media.load(parts)

    # -- sampling and limits --------------------------------------------------------------------

    def _sampling(
        self,
        body,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
        with_media: bool = False,
    ) -> SamplingOptions:
        limit = self.engine.max_model_len
        counted = " (images and audio counted as the tokens they become)" if with_media else ""
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, and the {prompt_param} "
                f"alone is {prompt_len} tokens{counted}. Shorten the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            field_name = (
                "max_completion_tokens"
                if getattr(body, "max_completion_tokens", None)
                else "max_tokens"
            )
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}{counted}, "
                f"{max_tokens} for the completion). Reduce {field_name} to at most "
                f"{limit - prompt_len} or shorten the {prompt_param}.",
                param=field_name,
                code="context_length_exceeded",
            )
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            n=body.n,
            stop=body.stop_list(),
            stop_token_ids=[] if body.ignore_eos else list(self.engine.policy.stop_token_ids),
            logprobs=logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            ignore_eos=body.ignore_eos,
        )

    def _check_token_ids(self, token_ids: list[int], index: int | None) -> None:
        vocab = self.engine.policy.vocab_size
        outside = [token for token in token_ids if token >= vocab]
        if outside:
            where = "prompt" if index is None else f"prompt[{index}]"
            raise APIError(
                400,
                f"{where} holds token id {outside[0]}, outside this model's vocabulary of {vocab} "
                f"tokens; send ids from 0 to {vocab - 1}",
                param=where,
                code="invalid_request",
            )

    def _admit(self) -> None:
        """Take a slot or refuse. The slot is taken here, before any await, so that a burst of
        requests cannot all pass the check before the first of them is counted."""
        if self.in_flight >= self.max_pending:
            self.metrics.rejected.inc()
            raise APIError(
                503,
                f"the server is at its limit of {self.max_pending} requests in flight; "
                "retry after a second (max_pending raises the limit)",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def _release(self) -> None:
        self.in_flight -= 1

    # -- responses ------------------------------------------------------------------------------

    async def _respond(self, body, requests: list[GenerationRequest], chat: bool, echo=None):
        self._admit()
        created = int(time.time())
        response_id = requests[0].request_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(body, requests, chat, created, response_id, include_usage, echo)
            return _AdmittedStream(
                stream,
                release=self._release,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )

        started = time.perf_counter()
        try:
            choices, prompt_tokens, prompt_ids = await self._collect(requests, body.n)
        finally:
            self._release()
        completion_tokens = sum(len(c.token_ids) for c in choices)
        self.metrics.observe_generation(
            prompt_tokens, completion_tokens, time.perf_counter() - started
        )
        payload = {
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                self._choice_body(i, c, chat, echo, body.n, body.return_token_ids)
                for i, c in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        if chat and body.return_token_ids:
            # As vLLM's server: the prompt as the model saw it, media markers expanded.
            payload["prompt_token_ids"] = prompt_ids[0]
        return JSONResponse(payload)

    async def _collect(self, requests, n: int) -> tuple[list[_Choice], int, list[list[int]]]:
        choices = [_Choice() for _ in range(len(requests) * n)]
        prompt_tokens = 0
        prompt_ids: list[list[int]] = [[] for _ in requests]
        async for prompt_index, step in _merged(self.engine, requests):
            if step.prompt_tokens and step.finished:
                prompt_tokens += step.prompt_tokens
            if step.prompt_token_ids is not None:
                prompt_ids[prompt_index] = step.prompt_token_ids
            for delta in step.choices:
                choice = choices[prompt_index * n + delta.index]
                choice.text += delta.text
                choice.token_ids.extend(delta.token_ids)
                if delta.logprobs:
                    choice.logprobs.extend(delta.logprobs)
                choice.finish_reason = delta.finish_reason or choice.finish_reason
        return choices, prompt_tokens, prompt_ids

    def _choice_body(self, index, choice: _Choice, chat: bool, echo, n: int, ids: bool) -> dict:
        finish = _finish(choice.finish_reason)
        if chat:
            body = {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None,
                "finish_reason": finish,
            }
            if choice.logprobs:
                body["logprobs"] = {"content": [_chat_logprob(lp) for lp in choice.logprobs]}
        else:
            text = (echo[index // n] if echo else "") + choice.text
            body = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if choice.logprobs:
                body["logprobs"] = _completion_logprobs(choice.logprobs)
        if ids:
            body["token_ids"] = choice.token_ids
        return body

    async def _stream(self, body, requests, chat, created, response_id, include_usage, echo):
        kind = "chat.completion.chunk" if chat else "text_completion"
        n = body.n
        prompt_tokens = 0
        completion_tokens = 0
        started = time.perf_counter()
        first_token_at = None

        def chunk(choices, usage=None) -> str:
            payload = {
                "id": response_id,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(len(requests) * n)
                    ]
                )
            elif echo:
                yield chunk(
                    [
                        {"index": i, "text": echo[i // n], "logprobs": None, "finish_reason": None}
                        for i in range(len(requests) * n)
                    ]
                )
            async for prompt_index, step in _merged(self.engine, requests):
                if step.finished:
                    prompt_tokens += step.prompt_tokens
                out = []
                for delta in step.choices:
                    if not delta.token_ids and not delta.text and not delta.finish_reason:
                        continue
                    if first_token_at is None and delta.token_ids:
                        first_token_at = time.perf_counter()
                    completion_tokens += len(delta.token_ids)
                    out.append(_stream_choice(prompt_index * n + delta.index, delta, chat))
                if out:
                    yield chunk(out)
            if include_usage:
                yield chunk([], _usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
            self.metrics.observe_generation(
                prompt_tokens,
                completion_tokens,
                time.perf_counter() - started,
                first_token_at and first_token_at - started,
            )
        except asyncio.CancelledError:
            logger.info("client went away; request %s aborted", response_id)
            raise
        except Exception as error:  # once streaming, an error can only be reported in-band
            api_error = to_api_error(error)
            payload = error_body(
                api_error.status, api_error.message, api_error.param, api_error.code
            )
            yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"


class _AdmittedStream(StreamingResponse):
    """A stream that holds its admission slot until it ends, however it ends: a generator that
    never started (the client left before the first byte) runs no `finally` of its own."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _merged(
    engine: Engine, requests: list[GenerationRequest]
) -> AsyncIterator[tuple[int, GenerationStep]]:
    """Steps of several engine requests, as they come, tagged with the prompt's index."""
    if len(requests) == 1:
        async for step in engine.generate(requests[0]):
            yield 0, step
        return

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async for step in engine.generate(request):
                await queue.put((index, step))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _stream_choice(index: int, delta, chat: bool) -> dict:
    finish = _finish(delta.finish_reason)
    if chat:
        body = {
            "index": index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": None,
            "finish_reason": finish,
        }
        if delta.logprobs:
            body["logprobs"] = {"content": [_chat_logprob(lp) for lp in delta.logprobs]}
        return body
    body = {"index": index, "text": delta.text, "logprobs": None, "finish_reason": finish}
    if delta.logprobs:
        body["logprobs"] = _completion_logprobs(delta.logprobs)
    return body


def _finish(reason: str | None) -> str | None:
    # vLLM says "abort" for a request cut short by the server; OpenAI has no such value.
    return {"abort": "stop"}.get(reason, reason) if reason else None


def _chat_logprob(lp) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token.encode("utf-8")),
        "top_logprobs": [
            {"token": tok, "logprob": value, "bytes": list(tok.encode("utf-8"))}
            for _, tok, value in lp.top
        ],
    }


def _completion_logprobs(logprobs) -> dict:
    offsets, position = [], 0
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{tok: value for _, tok, value in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _prompt_list(prompt) -> list:
    """OpenAI's `prompt` is a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty; send a string or a list of token ids", param="prompt")
    return list(prompt)


def _warn_unknown(body, path: str) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        # repr() keeps a client's field name on one log line, whatever characters it holds.
        names = ", ".join(repr(name)[:80] for name in extra)
        logger.warning("%s: ignoring fields this server does not use: %s", path, names)
