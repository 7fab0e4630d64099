"""Generation backends behind one interface, and the choice between them."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from quant.chat import ChatPolicy
from serve.config import ServeConfig
from serve.engine.base import Engine

logger = logging.getLogger(__name__)


def modalities_of(model_path: Path) -> frozenset[str]:
    """What inputs a checkpoint takes, read from its config rather than guessed from its name."""
    config = json.loads((model_path / "config.json").read_text())
    found = {"text"}
    if config.get("vision_config"):
        found.add("image")
    if config.get("audio_config"):
        found.add("audio")
    return frozenset(found)


def choose_engine(config: ServeConfig) -> tuple[str, str]:
    """(engine, reason): vLLM where it runs and supports the format, transformers otherwise."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if config.engine == "vllm":
        if not has_vllm:
            raise RuntimeError(
                "engine=vllm was asked for but vLLM is not installed here; "
                "use engine=transformers (or auto)"
            )
        return "vllm", "asked for"
    if config.engine == "transformers":
        return "transformers", "asked for"
    if not has_vllm:
        return "transformers", "vLLM is not installed on this machine"
    if config.bits < 16:
        return "transformers", (
            f"{config.bits}-bit on-the-fly quantisation is not a format vLLM "
            "loads; the transformers engine serves it"
        )
    return "vllm", "vLLM is installed and serves bf16 checkpoints"


class ParallelismError(ValueError):
    """Parallel settings this machine cannot honour; the message says which and why."""


def check_parallelism(config: ServeConfig, gpus: int | None = None) -> None:
    """Validate vLLM's parallel settings against this machine before vLLM tries them.

    They are vLLM's own (tensor, pipeline and data parallel size; `mp` or `ray` executor) and are
    handed through unchanged; this only turns vLLM's late, deep failures into an early message.
    """
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems = []
    needed = config.world_size * config.data_parallel_size
    if needed > 1 and gpus == 0:
        problems.append(
            f"tensor_parallel_size={config.tensor_parallel_size} x pipeline_parallel_size="
            f"{config.pipeline_parallel_size} x data_parallel_size={config.data_parallel_size} "
            f"needs {needed} GPUs, and this machine has none; set all three to 1 here"
        )
    elif gpus and needed > gpus and config.distributed_executor_backend != "ray":
        problems.append(
            f"the parallel sizes need {needed} GPUs and this machine has {gpus}; lower them, or "
            "set distributed_executor_backend: ray to span a Ray cluster of several machines"
        )
    if config.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        problems.append("distributed_executor_backend=ray needs Ray: pip install 'ray[default]'")
    if config.engine == "transformers" and needed > 1:
        problems.append(
            "parallel sizes above 1 need engine=vllm (the transformers engine runs on one device)"
        )
    if problems:
        raise ParallelismError("; ".join(problems))


def build_engine(config: ServeConfig, model_path: Path, policy: ChatPolicy) -> Engine:
    check_parallelism(config)
    kind, reason = choose_engine(config)
    logger.info("engine: %s (%s)", kind, reason)
    modalities = modalities_of(model_path)
    if kind == "vllm":
        from serve.engine.vllm_engine import VllmEngine, VllmSettings, apply_cpu_environment

        settings = VllmSettings(
            model_path=str(model_path),
            served_name=config.name,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enforce_eager=config.enforce_eager,
            enable_lora=config.enable_lora,
            max_lora_rank=config.max_lora_rank,
            max_loras=config.max_loras,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            data_parallel_size=config.data_parallel_size,
            distributed_executor_backend=config.distributed_executor_backend,
            trust_remote_code=config.trust_remote_code,
            allow_pickle=config.allow_pickle,
            limit_mm_per_prompt={"image": config.max_images, "audio": config.max_audios}
            if len(modalities) > 1
            else None,
            cpu_kv_cache_gib=config.cpu_kv_cache_gib,
            cpu_threads_bind=config.resolved_threads_bind(),
            cpu_reserved=config.cpu_reserved,
        )
        apply_cpu_environment(settings)
        return VllmEngine(settings, policy, modalities)

    from serve.engine.hf_engine import TransformersEngine

    return TransformersEngine(config, model_path, policy, modalities)
