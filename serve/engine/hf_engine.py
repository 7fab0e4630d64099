"""A transformers engine: the same API where vLLM cannot run (Apple silicon, no vLLM build) or
cannot load the format (bitsandbytes or 3-bit weights on the CPU).

It serves one generation at a time (transformers has no continuous-batching scheduler) and uses
`model.generate` for decoding; this module only streams its tokens out, applies stop strings and
reports logprobs. The model comes from `quant.load`, so a model name means what it means elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from serve.engine.base import (
    AdapterError,
    ChoiceDelta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    GenerationStep,
    TokenLogprob,
    dtype_bits,
    dtype_name,
)

logger = logging.getLogger(__name__)


class TransformersEngine(Engine):
    name = "transformers"
    supports_adapters = True

    def __init__(self, config, model_path: Path, policy, modalities: frozenset[str]):
        self.config = config
        self.model_path = model_path
        self.policy = policy
        self.model_name = config.name
        self.modalities = modalities
        self.max_model_len = config.max_model_len or 0
        self.loaded = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._running = 0
        self._adapters: dict[str, str] = {}

    async def start(self) -> None:
        from quant import load

        started = time.monotonic()
        self.loaded = await asyncio.to_thread(
            load, str(self.model_path), self.config.bits, self.config.quant_method,
            self.config.device,
        )  # fmt: skip
        text_config = getattr(self.loaded.model.config, "text_config", self.loaded.model.config)
        native = getattr(text_config, "max_position_embeddings", 8192)
        self.max_model_len = min(self.config.max_model_len or native, native)
        logger.info(
            "transformers engine ready for %s in %.0f s (%s bits, %s, max_model_len=%d)",
            self.model_name, time.monotonic() - started, self.loaded.bits, self.loaded.device,
            self.max_model_len,
        )  # fmt: skip

    async def shutdown(self) -> None:
        self.loaded = None

    def healthy(self) -> bool:
        return self.loaded is not None

    def quantization(self) -> dict | None:
        loaded = self.loaded
        if loaded is None:
            return None
        # The loader says bits=16 for its unquantised level, also where it fell back to fp32.
        bits = dtype_bits(loaded.dtype) if loaded.method == "none" else loaded.bits
        return {
            "bits": bits,
            "method": loaded.method,
            "dtype": dtype_name(loaded.dtype),
            "engine": self.name,
        }

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running + self._waiting, waiting=self._waiting)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationStep]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterError(f"adapter {request.adapter!r} is not loaded", status=404)

        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            async for step in self._generate_locked(request):
                yield step
        finally:
            self._running -= 1
            self._lock.release()

    async def _generate_locked(self, request: GenerationRequest) -> AsyncIterator[GenerationStep]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        inputs = await asyncio.to_thread(self._model_inputs, request)
        run = _Run(self, request, inputs, queue, loop, cancel)
        worker = loop.run_in_executor(None, run.generate)
        decoders = [_Decoder(self.policy.tokenizer, request, i) for i in range(request.sampling.n)]
        prompt_tokens = inputs["input_ids"].shape[-1]
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                tokens, logprobs = item
                deltas = [
                    d.push(t, lp) for d, t, lp in zip(decoders, tokens, logprobs, strict=True)
                ]
                if all(d.finished for d in decoders):
                    cancel.set()
                deltas = [d for d in deltas if d is not None]
                if deltas:
                    yield GenerationStep(choices=deltas, prompt_tokens=prompt_tokens)
            yield GenerationStep(
                choices=[d.close() for d in decoders if not d.closed],
                prompt_tokens=prompt_tokens,
                finished=True,
                prompt_token_ids=inputs["input_ids"][0].tolist(),
            )
        finally:
            cancel.set()  # the client left, or the step loop ended: stop the decoding thread
            await asyncio.shield(worker)

    async def prompt_length(self, request: GenerationRequest) -> int:
        if not request.media:
            return len(request.prompt_token_ids)
        # The processor's output is what generation feeds the model: keep it for generate().
        request.engine_inputs = await asyncio.to_thread(self._model_inputs, request)
        return request.engine_inputs["input_ids"].shape[-1]

    def _model_inputs(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """One prompt's model inputs: its token ids, or with media what the model's processor
        makes of the rendered text (placeholders expanded) and the decoded images and audio."""
        if request.engine_inputs is not None:
            return request.engine_inputs
        if not request.media:
            return {"input_ids": torch.tensor([request.prompt_token_ids])}
        from serve.media import processor_inputs

        processor = self.loaded.tokenizer
        if not hasattr(processor, "tokenizer"):
            raise EngineError(
                f"{self.model_path} has media inputs in its config but no processor files "
                "(processor_config.json / preprocessor_config.json); add them to the checkpoint"
            )
        inputs = processor_inputs(processor, request.prompt_text, request.media)
        dtype = self.loaded.dtype
        return {
            key: value.to(dtype) if value.is_floating_point() else value
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }

    # -- adapters -------------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        async with self._lock:
            model = self.loaded.model
            if name in self._adapters:
                model.delete_adapter(name)
            try:
                await asyncio.to_thread(model.load_adapter, path, adapter_name=name)
            except Exception as error:
                raise AdapterError(f"could not load adapter {name!r}: {error}", 400) from error
            self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not loaded", status=404, param="lora_name")
        async with self._lock:
            self.loaded.model.delete_adapter(name)
            del self._adapters[name]


_DONE = object()


class _Run:
    """One `model.generate` call on a worker thread, feeding (tokens, logprobs) per step."""

    def __init__(self, engine: TransformersEngine, request, inputs, queue, loop, cancel):
        self.engine = engine
        self.request = request
        self.inputs = inputs
        self.queue = queue
        self.loop = loop
        self.cancel = cancel
        self.step_logprobs: list[torch.Tensor] = []

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def generate(self) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        try:
            model = self.engine.loaded.model
            opts = self.request.sampling
            self._select_adapter(model)
            # n choices as a batch of n copies: works for greedy too, unlike num_return_sequences.
            # Per-image / per-clip tensors repeat the same way, so copy k keeps its own media.
            device = self.engine.loaded.device
            batch = {
                key: torch.cat([value] * opts.n).to(device) for key, value in self.inputs.items()
            }
            batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            greedy = opts.temperature == 0
            kwargs = dict(
                **batch,
                max_new_tokens=opts.max_tokens,
                do_sample=not greedy,
                eos_token_id=list(opts.stop_token_ids) or None,
                pad_token_id=self.engine.policy.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([_Penalties(opts), _Recorder(self)]),
                stopping_criteria=StoppingCriteriaList([_Cancelled(self.cancel)]),
                streamer=_Streamer(self),
            )
            if opts.ignore_eos:
                # generate() always stops on the model's own end ids; holding them back until
                # max_tokens is the nearest it offers to vLLM's ignore_eos.
                kwargs["min_new_tokens"] = opts.max_tokens
            if not greedy:
                kwargs.update(
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    top_k=opts.top_k if opts.top_k > 0 else None,
                )
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as error:  # surfaced to the request, never swallowed
            self._put(error)
        finally:
            self._put(_DONE)

    def _select_adapter(self, model) -> None:
        if not self.engine._adapters:
            return
        if self.request.adapter is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(self.request.adapter)


class _Streamer:
    """transformers calls `put` with the prompt first, then with each step's new tokens."""

    def __init__(self, run: _Run):
        self.run = run
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        tokens = value.reshape(-1).tolist()
        logprobs = self.run.step_logprobs.pop(0) if self.run.step_logprobs else None
        per_choice = [None] * len(tokens) if logprobs is None else list(logprobs)
        self.run._put((tokens, per_choice))

    def end(self) -> None:
        pass


class _Recorder:
    """Keeps each step's log-probabilities (before sampling) for the logprobs field."""

    def __init__(self, run: _Run):
        self.run = run

    def __call__(self, input_ids, scores):
        if self.run.request.sampling.logprobs is not None:
            self.run.step_logprobs.append(torch.log_softmax(scores.float(), dim=-1))
        return scores


class _Penalties:
    """OpenAI's presence and frequency penalties, which transformers does not offer."""

    def __init__(self, opts):
        self.prompt_len = None
        self.presence = opts.presence_penalty
        self.frequency = opts.frequency_penalty

    def __call__(self, input_ids, scores):
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        if not (self.presence or self.frequency) or input_ids.shape[1] == self.prompt_len:
            return scores
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _Cancelled:
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _Decoder:
    """Incremental detokenisation of one choice, with stop ids, stop strings and max_tokens."""

    def __init__(self, tokenizer, request: GenerationRequest, index: int):
        self.tokenizer = tokenizer
        self.index = index
        self.opts = request.sampling
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.reported = 0  # tokens already counted in a delta
        self.finished: str | None = None
        self.closed = False
        self.pending_logprobs: list[TokenLogprob] = []
        self.hold = max((len(s) for s in self.opts.stop), default=1) - 1

    def push(self, token: int, logprobs: torch.Tensor | None) -> ChoiceDelta | None:
        if self.finished:
            return None
        if token in self.opts.stop_token_ids:
            self.finished = "stop"
            return self._delta(final=True)
        self.token_ids.append(token)
        if logprobs is not None:
            self.pending_logprobs.append(self._logprob(token, logprobs))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.opts.stop:
            at = text.find(stop)
            if at != -1:
                self.finished = "stop"
                return self._delta(text=text[:at], final=True)
        if len(self.token_ids) >= self.opts.max_tokens:
            self.finished = "length"
            return self._delta(text=text, final=True)
        # Hold back what could still become a stop string, and a partial UTF-8 character.
        safe = len(text) - self.hold if self.hold else len(text)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._delta(text=text[: max(safe, self.emitted)])

    def close(self) -> ChoiceDelta:
        if not self.finished:
            self.finished = "length" if len(self.token_ids) >= self.opts.max_tokens else "stop"
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._delta(text=text, final=True)

    def _delta(self, text: str | None = None, final: bool = False) -> ChoiceDelta:
        if text is None:
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        new = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        logprobs, self.pending_logprobs = self.pending_logprobs or None, []
        new_tokens, self.reported = self.token_ids[self.reported :], len(self.token_ids)
        self.closed = self.closed or final
        return ChoiceDelta(
            index=self.index,
            text=new,
            token_ids=new_tokens,
            logprobs=logprobs,
            finish_reason=self.finished if final else None,
        )

    def _logprob(self, token: int, logprobs: torch.Tensor) -> TokenLogprob:
        k = self.opts.logprobs or 0
        top = torch.topk(logprobs, k) if k else None
        decode = self.tokenizer.decode
        return TokenLogprob(
            token_id=token,
            token=decode([token]),
            logprob=float(logprobs[token]),
            top=[(int(i), decode([int(i)]), float(v)) for v, i in zip(*top, strict=True)]
            if top is not None
            else [],
        )
