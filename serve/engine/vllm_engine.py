"""vLLM's async engine, in this process, behind the Engine interface.

vLLM runs its engine core in a child process it spawns itself; this module talks to it only through
the public `AsyncLLM` API (generate, abort, add_lora, remove_lora). Prompts arrive as token ids that
the chat policy rendered, so vLLM never applies a template or adds a BOS of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.engine.base import (
    AdapterError,
    ChoiceDelta,
    Engine,
    EngineStats,
    GenerationRequest,
    GenerationStep,
    TokenLogprob,
    dtype_bits,
    dtype_name,
)

logger = logging.getLogger(__name__)


@dataclass
class VllmSettings:
    """What the server passes through to vLLM's engine arguments."""

    model_path: str
    served_name: str
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 64
    max_loras: int = 4
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    limit_mm_per_prompt: dict[str, int] | None = None
    enforce_eager: bool = False
    # CPU build only: vLLM reads these from the environment when its engine core starts.
    cpu_kv_cache_gib: int | None = None
    cpu_threads_bind: str | None = None
    cpu_reserved: int | None = None
    # Whether the int4 kernel quantises activations to int8 on AMX CPUs (vLLM's default is 1).
    cpu_int4_w4a8: bool | None = None


def apply_cpu_environment(settings: VllmSettings) -> None:
    """Set the CPU build's knobs; a value the user already exported wins over our default."""
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": settings.cpu_kv_cache_gib,
        "VLLM_CPU_OMP_THREADS_BIND": settings.cpu_threads_bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": settings.cpu_reserved,
        "VLLM_CPU_INT4_W4A8": None
        if settings.cpu_int4_w4a8 is None
        else int(settings.cpu_int4_w4a8),
    }
    for key, value in defaults.items():
        if value is not None and key not in os.environ:
            os.environ[key] = str(value)
    logger.info(
        "vLLM CPU settings: %s",
        ", ".join(f"{key}={os.environ.get(key, '(vLLM default)')}" for key in defaults),
    )


def checkpoint_quantization(model_path: Path, dtype: Any) -> dict[str, Any]:
    """How the checkpoint vLLM loaded stores its weights: its `quantization_config` (the 4-bit
    export of `quant.export_vllm`, or any checkpoint saved quantised), or else `dtype`, the
    unquantised dtype vLLM loaded it in. `codes` is how the export chose its 4-bit codes."""
    config = json.loads((model_path / "config.json").read_text())
    facts = config.get("quantization_config")
    if not isinstance(facts, dict):
        facts = (config.get("text_config") or {}).get("quantization_config")
    if not isinstance(facts, dict):
        return {"bits": dtype_bits(dtype), "method": "none", "dtype": dtype_name(dtype),
                "engine": "vllm"}  # fmt: skip
    found: dict[str, Any] = {
        "bits": facts.get("bits") or facts.get("w_bit"),
        "method": str(facts.get("quant_method", "unknown")),
    }
    group_size = facts.get("group_size") or facts.get("q_group_size")
    if group_size:
        found["group_size"] = group_size
    from quant.loader import FACTS_KEY

    codes = (config.get(FACTS_KEY) or {}).get("rounding")
    if codes:
        found["codes"] = codes
    return {**found, "dtype": dtype_name(dtype), "engine": "vllm"}


class VllmEngine(Engine):
    name = "vllm"
    supports_adapters = True

    def __init__(self, settings: VllmSettings, policy, modalities: frozenset[str]):
        self.settings = settings
        self.policy = policy
        self.model_name = settings.served_name
        self.modalities = modalities
        self.supports_adapters = settings.enable_lora
        self.max_model_len = settings.max_model_len or 0
        self._llm = None
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        self._next_adapter_id = 1
        self._kv = None  # serve.engine.vllm_kv.KVStatLogger once started
        self._quantization: dict[str, Any] | None = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from serve.engine.vllm_kv import KVStatLogger, WindowKVScheduler

        started = time.monotonic()
        s = self.settings
        args = AsyncEngineArgs(
            model=s.model_path,
            served_model_name=s.served_name,
            max_model_len=s.max_model_len,
            dtype=s.dtype,
            seed=s.seed,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_lora=s.enable_lora,
            max_lora_rank=s.max_lora_rank,
            max_loras=s.max_loras,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            data_parallel_size=s.data_parallel_size,
            distributed_executor_backend=s.distributed_executor_backend,
            trust_remote_code=s.trust_remote_code,
            load_format="auto" if s.allow_pickle else "safetensors",
            limit_mm_per_prompt=s.limit_mm_per_prompt or {},
            enforce_eager=s.enforce_eager,
            disable_log_stats=False,
            # Reports the KV blocks local and global layers hold (see serve/engine/vllm_kv.py).
            scheduler_cls=f"{WindowKVScheduler.__module__}.{WindowKVScheduler.__qualname__}",
        )
        self._kv = KVStatLogger()
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[lambda *_: self._kv])
        self.max_model_len = self._llm.model_config.max_model_len
        self._quantization = checkpoint_quantization(
            Path(s.model_path), self._llm.model_config.dtype
        )
        logger.info(
            "vLLM engine ready for %s in %.0f s (max_model_len=%d)",
            s.served_name,
            time.monotonic() - started,
            self.max_model_len,
        )

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def quantization(self) -> dict[str, Any] | None:
        return None if self._quantization is None else dict(self._quantization)

    def stats(self) -> EngineStats:
        if self._llm is None:
            return EngineStats()
        extra = self._kv.gauges() if self._kv is not None else {}
        return EngineStats(running=self._llm.get_num_unfinished_requests(), extra=extra)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationStep]:
        lora = None
        if request.adapter is not None:
            lora = self._adapters.get(request.adapter)
            if lora is None:
                raise AdapterError(f"adapter {request.adapter!r} is not loaded", status=404)

        prompt = self._prompt(request)
        params = self._sampling_params(request)
        top_k = request.sampling.logprobs or 0
        # A text prompt (with media) already holds its one BOS: vLLM must not add another.
        tokenization = {"add_special_tokens": False} if "prompt" in prompt else None
        async for output in self._llm.generate(
            prompt, params, request.request_id, lora_request=lora, tokenization_kwargs=tokenization
        ):
            choices = [self._delta(completion, top_k) for completion in output.outputs]
            yield GenerationStep(
                choices=choices,
                prompt_tokens=len(output.prompt_token_ids or request.prompt_token_ids),
                finished=output.finished,
                prompt_token_ids=list(output.prompt_token_ids or request.prompt_token_ids)
                if output.finished
                else None,
            )

    async def prompt_length(self, request: GenerationRequest) -> int:
        if not request.media:
            return len(request.prompt_token_ids)
        # vLLM expands the media markers only inside generate(), where a prompt over the context
        # is an error from deep in the engine; the model's own HF processor (whose counts vLLM's
        # must match, or vLLM fails to place the embeddings) tells the length beforehand.
        from serve.media import processor_inputs

        processor = await asyncio.to_thread(self._processor)
        inputs = await asyncio.to_thread(
            processor_inputs, processor, request.prompt_text, request.media
        )
        return inputs["input_ids"].shape[-1]

    @functools.cache  # noqa: B019 (one engine per server; the processor lives as long as it)
    def _processor(self):
        from transformers import AutoProcessor

        from quant._compat import processors_without_torchvision

        processors_without_torchvision()
        return AutoProcessor.from_pretrained(self.settings.model_path)

    def _prompt(self, request: GenerationRequest) -> Any:
        if not request.media:
            return {"prompt_token_ids": request.prompt_token_ids}
        data: dict[str, list] = {}
        for item in request.media:
            data.setdefault(item["kind"], []).append(item["data"])
        # With media the processor must expand each placeholder into the right number of tokens,
        # so vLLM gets the rendered text (which already holds the one BOS) rather than ids.
        return {"prompt": request.prompt_text, "multi_modal_data": data}

    def _sampling_params(self, request: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        opts = request.sampling
        return SamplingParams(
            n=opts.n,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k if opts.top_k > 0 else 0,
            seed=opts.seed,
            stop=opts.stop or None,
            stop_token_ids=opts.stop_token_ids or None,
            max_tokens=opts.max_tokens,
            logprobs=opts.logprobs,
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            ignore_eos=opts.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    def _delta(self, completion, top_k: int) -> ChoiceDelta:
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [
                _token_logprob(token_id, entry, self.policy.tokenizer, top_k)
                for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=False)
            ]
        return ChoiceDelta(
            index=completion.index,
            text=completion.text,
            token_ids=list(completion.token_ids),
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
        )

    # -- adapters -------------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        if not self.settings.enable_lora:
            raise AdapterError(
                "this server was started without LoRA support; start it with --adapters-dir DIR "
                "(or --enable-lora)",
                status=400,
            )
        previous = self._adapters.get(name)
        request = LoRARequest(
            lora_name=name,
            lora_int_id=previous.lora_int_id if previous else self._next_adapter_id,
            lora_path=str(Path(path)),
            load_inplace=previous is not None,
        )
        if previous is None:
            self._next_adapter_id += 1
        try:
            await self._llm.add_lora(request)
        except Exception as error:  # vLLM reports a bad adapter as a plain exception
            raise AdapterError(f"vLLM could not load adapter {name!r}: {error}", 400) from error
        self._adapters[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is None:
            raise AdapterError(f"adapter {name!r} is not loaded", status=404, param="lora_name")
        await self._llm.remove_lora(request.lora_int_id)


def _token_logprob(token_id: int, entry: dict, tokenizer, k: int) -> TokenLogprob:
    """vLLM gives {token_id: Logprob} per position: the sampled token plus the top-k by rank."""
    sampled = entry.get(token_id)
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    top = sorted(ranked, key=lambda item: item[1].rank)
    return TokenLogprob(
        token_id=token_id,
        token=_decoded(token_id, sampled, tokenizer),
        logprob=sampled.logprob if sampled is not None else float("-inf"),
        top=[(tid, _decoded(tid, lp, tokenizer), lp.logprob) for tid, lp in top],
    )


def _decoded(token_id: int, logprob, tokenizer) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])
