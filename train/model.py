"""The base model and its LoRA: which weights, in what form, on which device, what is trained."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from quant import ResolvedModel, pick_device, pick_dtype, resolve_model

logger = logging.getLogger(__name__)

# Module-name fragments of the towers that turn images and audio into embeddings.
TOWERS = ("vision_tower", "audio_tower", "multi_modal_projector", "embed_vision", "embed_audio")
# Gemma 4 MoE: experts are packed 3-D parameters that only `target_parameters` reaches.
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    resolved: ResolvedModel
    device: torch.device
    dtype: torch.dtype
    load_in: str  # what was actually loaded, after any downgrade
    image_text: bool  # a Gemma 3 image-text class, which needs token_type_ids in training


def load_base(section, tokenizer=None) -> BaseModel:
    resolved = resolve_model(section.name)
    device = pick_device(section.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per `accelerate` process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = pick_dtype(device, "auto")
    config = AutoConfig.from_pretrained(resolved.path)
    image_text = hasattr(config, "vision_config")
    load_in = section.load_in
    if load_in != "bf16" and not _bnb_works(device, load_in):
        logger.warning(
            "model.load_in=%s: bitsandbytes cannot run %s on %s here; loading in %s instead "
            "(needs more memory; set model.load_in: bf16 to silence this)",
            load_in,
            load_in,
            device,
            dtype,
        )
        load_in = "bf16"

    started = time.perf_counter()
    model = _from_pretrained(resolved.path, dtype, device, load_in, image_text)
    # The chat policy's tokenizer, where the caller has one: a 262k-token vocabulary is ~100 MB.
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(resolved.path)
    logger.info(
        "loaded %s (%s, %s on %s) in %.1f s",
        resolved.name,
        type(model).__name__,
        load_in if load_in != "bf16" else dtype,
        device,
        time.perf_counter() - started,
    )
    return BaseModel(model, tokenizer, resolved, device, dtype, load_in, image_text)


def _from_pretrained(path: Path, dtype, device, load_in: str, image_text: bool):
    """The one place weights are read; a shared quantised loader in quant/ can replace it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    kwargs = {"dtype": dtype}
    if load_in != "bf16":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in == "4bit",
            load_in_8bit=load_in == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Towers and the tied output head stay in bf16: small, and sensitive to rounding.
            llm_int8_skip_modules=[*TOWERS, "lm_head"],
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else str(device)
        # FSDP shards parameters of one dtype; 4-bit weights are stored as bf16-typed bytes then.
        kwargs["quantization_config"].bnb_4bit_quant_storage = dtype
    model = cls.from_pretrained(path, **kwargs)
    if load_in == "bf16":
        model.to(device)
    return model


def _bnb_works(device: torch.device, load_in: str) -> bool:
    """Quantise one small layer and run it forward and backward: the honest test of support."""
    try:
        import bitsandbytes as bnb

        weight = torch.randn(32, 64, dtype=torch.bfloat16)
        if load_in == "4bit":
            layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.float(), requires_grad=False)
        layer = layer.to(device)
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        return x.grad is not None
    except Exception as error:  # any failure here means "not supported on this device"
        logger.info("bitsandbytes %s probe on %s failed: %s", load_in, device, error)
        return False


# -- LoRA ----------------------------------------------------------------------------------------


def lora_config(model: torch.nn.Module, section):
    from peft import LoraConfig

    targets = _target_modules(model, section)
    parameters = _expert_parameters(model) if section.target_experts else None
    if section.target_experts and not parameters:
        logger.warning("lora.target_experts=true, but this model has no packed expert parameters")
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        modules_to_save=["embed_tokens"] if section.train_embeddings else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _target_modules(model: torch.nn.Module, section) -> list[str] | str:
    """`all-linear` means every linear layer of the language model, never the output head; vision
    and audio towers only with `lora.include_towers`. A list is taken as written."""
    if section.target_modules != "all-linear":
        return list(section.target_modules)
    names = [name for name, module in model.named_modules() if _is_linear(module)]
    names = [n for n in names if not n.endswith("lm_head")]
    has_towers = any(_in_tower(n) for n in names)
    if not section.include_towers:
        names = [n for n in names if not _in_tower(n)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if not leaves:
        raise ValueError("lora.target_modules=all-linear found no linear layers in this model")
    if not has_towers or section.include_towers:
        return leaves  # plain suffixes: what every adapter loader (vLLM included) understands
    # Same leaf names exist inside the towers, so exclude them by path with a full-match regex.
    towers = "|".join(TOWERS)
    return rf"^(?!.*\b({towers})\b).*\.({'|'.join(map(re.escape, leaves))})$"


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _in_tower(name: str) -> bool:
    return any(tower in name.split(".") for tower in TOWERS)


def _expert_parameters(model: torch.nn.Module) -> list[str]:
    found = {
        suffix
        for name, _ in model.named_parameters()
        for suffix in EXPERT_PARAMETERS
        if name.endswith(suffix)
    }
    return sorted(found)


def attach_lora(base: BaseModel, section, gradient_checkpointing: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = base.model
    if base.load_in != "bf16":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config(model, section))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total
    )
    return peft_model
