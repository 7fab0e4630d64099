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


VLLM_INT4 = (
    "4-bit: an AWQ export with {method} codes (group {group}, output head quantised too) served "
    "by vLLM's int4 kernels"
)


def choose_engine(config: ServeConfig, model_path: Path | None = None) -> tuple[str, str]:
    """(engine, reason): vLLM where it runs and supports the format, transformers otherwise.

    At 4 bits vLLM serves a 4-bit export of the model (`quant.export_vllm`) when the checkpoint
    at `model_path` can be exported; without a path only the settings are checked.
    """
    has_vllm = importlib.util.find_spec("vllm") is not None
    if config.engine == "vllm" or config.quant_method == "awq":
        if not has_vllm:
            raise RuntimeError(
                f"{'engine=vllm' if config.engine == 'vllm' else 'quant_method=awq'} was asked "
                "for but vLLM is not installed here; use engine=transformers (or auto)"
            )
        if config.bits < 16:
            problem = vllm_quant_problem(config, model_path)
            if problem:
                raise RuntimeError(
                    f"vLLM cannot serve bits={config.bits} here: {problem}; use "
                    "engine=transformers (or auto)"
                )
            return "vllm", f"asked for; {_int4_reason()}"
        return "vllm", "asked for"
    if config.engine == "transformers":
        return "transformers", "asked for"
    if not has_vllm:
        return "transformers", "vLLM is not installed on this machine"
    if config.bits < 16:
        problem = vllm_quant_problem(config, model_path)
        if problem:
            return "transformers", (
                f"{config.bits}-bit: {problem}; the transformers engine quantises on the fly"
            )
        return "vllm", _int4_reason()
    return "vllm", "vLLM is installed and serves bf16 checkpoints"


def vllm_quant_problem(config: ServeConfig, model_path: Path | None) -> str | None:
    """Why vLLM cannot serve `config.bits` of this model, or None when an export will do."""
    from quant.export_vllm import ExportSettings, unsupported_reason

    if config.quant_method not in (None, "awq"):
        return f"quant_method={config.quant_method} is a method of the transformers engine"
    if config.bits != 4:
        return f"{config.bits}-bit is not a format vLLM loads (its int4 kernels take 4-bit only)"
    if not _vllm_has_awq():
        return "this vLLM build has no AWQ loader"
    if model_path is None:
        return None
    return unsupported_reason(model_path, ExportSettings())


def _int4_reason() -> str:
    from quant.export_vllm import ExportSettings

    settings = ExportSettings()
    method = {"gptq": "GPTQ", "rtn": "round-to-nearest"}[settings.method]
    return VLLM_INT4.format(method=method, group=settings.group_size)


def _vllm_has_awq() -> bool:
    """Whether vLLM ships its AWQ loader, looked up on disk: importing vLLM takes seconds."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    return (root / "model_executor/layers/quantization/auto_awq.py").exists()


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
    kind, reason = choose_engine(config, model_path)
    logger.info("engine: %s (%s)", kind, reason)
    modalities = modalities_of(model_path)
    if kind == "vllm":
        from serve.engine.vllm_engine import VllmEngine, VllmSettings, apply_cpu_environment

        served_path = model_path
        if config.bits < 16:
            from quant.export_vllm import export

            served_path = export(model_path)  # cached: written once per source and settings
        settings = VllmSettings(
            model_path=str(served_path),
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
            # No video: the server takes none, and vLLM would otherwise reserve memory and run a
            # profiling pass for 999 videos of 32 frames each on models that can take them.
            limit_mm_per_prompt={"image": config.max_images, "audio": config.max_audios, "video": 0}
            if len(modalities) > 1
            else None,
            cpu_kv_cache_gib=config.cpu_kv_cache_gib,
            cpu_threads_bind=config.resolved_threads_bind(),
            cpu_reserved=config.cpu_reserved,
            # Only a 4-bit export runs the int4 kernel; bf16 leaves vLLM's variable alone.
            cpu_int4_w4a8=config.cpu_int4_w4a8 if config.bits < 16 else None,
        )
        apply_cpu_environment(settings)
        return VllmEngine(settings, policy, modalities)

    from serve.engine.hf_engine import TransformersEngine

    return TransformersEngine(config, model_path, policy, modalities)
