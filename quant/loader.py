"""One loader for every precision: `quant.load(model, bits=16|8|4|3, method=None, device="auto")`.

    from quant import load
    loaded = load("gemma-3-270m", bits=4)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").to(loaded.device)
    out = loaded.model.generate(**ids, max_new_tokens=20)

Levels and methods (`method=None` picks the first listed that fits the device):
- 16: bf16 (fp32 where the device has no bf16; float16 is refused for Gemma).
- 8: `bnb` (bitsandbytes' int8; CUDA and CPU) or `hqq` (the default on MPS).
- 4: `gptq`, `bnb` (NF4; the default on CUDA) or `hqq`.
- 3: `gptq` or `hqq`.
`gptq` chooses the codes with GPTQ on calibration text (`quant.gptq`; about 30 s more per load
for the 270M on 2 cores) and stores them as HQQ does; `hqq` is HQQ's own calibration-free
quantiser. Both are bit-packed plain torch, so they run wherever torch runs: CUDA, MPS, CPU. On
Gemma 3 270M GPTQ cuts the perplexity increase at 4 bits from 28% (NF4) and 42% (HQQ) to 7%, and
at 3 bits from 918% (HQQ) to 58% (benchmarks/results/quant_gemma-3-270m.csv).
A checkpoint that is already quantised (saved by `quant.save_quantised`, or GPTQ / AWQ /
compressed-tensors / bitsandbytes / torchao with a `quantization_config`) is recognised from its
config and loaded as saved. A `.gguf` file is dequantised to bf16 by transformers (`quant.resolve`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant import _compat
from quant.codecs import Codec, Int8Embedding, Int8Head, QuantLinear, embed_scale_of
from quant.device import pick_device, pick_dtype
from quant.moe import is_packed_experts, is_quantised_experts, quantise_experts
from quant.report import QuantReport, build_report, module_name
from quant.resolve import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

LEVELS = (16, 8, 4, 3)
METHODS = {16: ("none",), 8: ("bnb", "hqq"), 4: ("gptq", "bnb", "hqq"), 3: ("gptq", "hqq")}
FACTS_KEY = "gemma_stack_quantization"  # the quantisation facts, in a saved checkpoint's config

# Kept in high precision, by module name part, with the reason the report prints.
KEEP = {
    "lm_head": "output head left as loaded (quantise_head=False; tied to the embedding table "
    "where the model ties them)",
    "router": "MoE router: routing decisions are sensitive to small weight errors",
    "vision_tower": "vision tower kept high precision",
    "audio_tower": "audio tower kept high precision",
    "embed_vision": "multimodal projector kept high precision",
    "embed_audio": "multimodal projector kept high precision",
    "multi_modal_projector": "multimodal projector kept high precision",
}


class LoadError(ValueError):
    """A load request that cannot be honoured; the message names field, value and fix."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode, on `device`
    tokenizer: Any  # a tokenizer, or a processor for image/audio-text checkpoints
    report: QuantReport  # what was quantised, how, and what was skipped and why
    resolved: ResolvedModel
    bits: int
    method: str  # "none", "bnb", "hqq", or a pre-quantised checkpoint's quant_method
    device: torch.device
    dtype: torch.dtype  # the compute dtype (bf16, or fp32 without bf16)

    @property
    def text_tokenizer(self):
        """The tokenizer itself, also when `tokenizer` is a multimodal processor."""
        return getattr(self.tokenizer, "tokenizer", self.tokenizer)


def load(
    model: str | Path,
    bits: int = 16,
    method: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    quantise_head: bool | None = None,
) -> LoadedModel:
    """Load `model` (a name, a checkpoint directory or a .gguf file) at `bits` on `device`.

    `quantise_head` (default: on below 16 bits) gives the output projection an int8 table
    (`quant.codecs.Int8Head`), which a tied input embedding then reads too (`Int8Embedding`). A
    saved checkpoint records whether it did, and is rebuilt the same way.
    """
    started = time.monotonic()
    _compat.apply()
    if bits not in LEVELS:
        raise LoadError(f"bits={bits!r} is not one of {LEVELS}; pass 16, 8, 4 or 3")
    resolved = resolve_model(str(model))
    target = pick_device(device)
    config = _config(resolved.path)
    saved = getattr(config, FACTS_KEY, None)
    if saved and dtype == "auto" and saved.get("compute_dtype") == "float32":
        dtype = "float32"  # saved from an fp32 model: bf16 would not give the same outputs
    compute_dtype = pick_dtype(target, dtype)

    if saved:
        from quant.saved import load_saved

        net, report = load_saved(resolved.path, config, target, compute_dtype)
    elif getattr(config, "quantization_config", None):
        net, report = _load_prequantised(resolved.path, config, target, compute_dtype)
    else:
        chosen = _choose_method(bits, method, target)
        head = bits < 16 if quantise_head is None else quantise_head
        net, report = _load_and_quantise(
            resolved.path, bits, chosen, target, compute_dtype, head
        )  # fmt: skip

    if saved or getattr(config, "quantization_config", None):
        _warn_ignored(resolved.path, report, bits, method, quantise_head)
    loaded = LoadedModel(
        net, _load_tokenizer(resolved.path), report, resolved, report.bits, report.method,
        target, compute_dtype,
    )  # fmt: skip
    logger.info(
        "loaded %s at %s bits (%s) on %s in %.1f s\n%s", resolved.name, report.bits,
        report.method, target, time.monotonic() - started, report.render(),
    )  # fmt: skip
    return loaded


def _warn_ignored(path, report: QuantReport, bits, method, quantise_head) -> None:
    """A checkpoint saved quantised is loaded as saved: say which requests that overrides."""
    ignored = []
    if bits != report.bits and not (bits == 16 and method is None):
        ignored.append(f"bits={bits}")
    if method is not None and method != report.method:
        ignored.append(f"method={method!r}")
    if quantise_head is not None and quantise_head != (report.head != "tied"):
        ignored.append(f"quantise_head={quantise_head}")
    if ignored:
        logger.warning(
            "%s ignored: %s is saved quantised (%s bits, %s, head %s) and loads as saved",
            ", ".join(ignored), path, report.bits, report.method, report.head,
        )  # fmt: skip


def _choose_method(bits: int, method: str | None, device: torch.device) -> str:
    allowed = METHODS[bits]
    if isinstance(method, str):
        method = method.lower()  # "GPTQ", "HQQ" as the libraries spell themselves
    if method is None:
        if bits == 4 and device.type == "cuda":
            return "bnb"  # NF4's CUDA kernels; GPTQ's column-by-column rounding runs on the CPU
        if bits == 8 and device.type == "mps":
            return "hqq"  # bitsandbytes' MPS support is partial; HQQ is plain torch
        return allowed[0]
    if method not in allowed:
        raise LoadError(
            f"method={method!r} does not offer bits={bits}; for {bits} bits use one of "
            f"{', '.join(allowed)} (or method=None to pick one)"
        )
    return method


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def model_class(config):
    import transformers

    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def _load_plain(path: Path, device: torch.device, dtype: torch.dtype, **kwargs):
    net = model_class(_config(path)).from_pretrained(path, dtype=dtype, **kwargs)
    if not kwargs.get("quantization_config"):
        net = net.to(device)
    return net.eval()


def _load_and_quantise(path, bits, method, device, dtype, head: bool):
    if bits == 16:
        net = _load_plain(path, device, dtype)
        if head:  # bf16 weights with an int8 head: isolates what the head alone is worth
            quantise_output_head(net, dtype)
        return net, build_report(net, "none", 16)
    codec = Codec(method, bits)
    if method == "bnb":
        net = _load_plain(
            path, device, dtype, quantization_config=_bnb_config(bits, dtype),
            device_map={"": str(device)},
        )  # fmt: skip
        skipped = {name: why for name, _, why in _linear_plan(net) if why}
    else:
        net = _load_plain(path, device, dtype)
        hessians = _calibrate(net, path) if method == "gptq" else None
        skipped = quantise_linears(net, codec, dtype, hessians)
    skipped.update(quantise_all_experts(net, codec, dtype))
    if head:
        skipped.pop(quantise_output_head(net, dtype), None)
    report = build_report(net, method, bits, skipped)
    if method == "gptq":
        report.notes.extend(_gptq_notes(net, hessians))
    return net, report


def _calibrate(net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """GPTQ's Hessians for the linear layers the calibration text reaches."""
    from transformers import AutoTokenizer

    from quant.gptq import calibrate_model

    targets = {name for name, _, why in _linear_plan(net) if not why}
    hessians, _ = calibrate_model(net, AutoTokenizer.from_pretrained(path), targets)
    return hessians


def _gptq_notes(net: nn.Module, hessians: dict[str, torch.Tensor]) -> list[str]:
    """Which quantised tensors got HQQ's quantiser instead of GPTQ, and why."""
    notes = []
    unreached = sorted(
        name
        for name, module in net.named_modules()
        if isinstance(module, QuantLinear) and name not in hessians
    )
    if unreached:
        notes.append(
            f"HQQ's quantiser for {len(unreached)} linear layers the calibration text never "
            f"reaches ({', '.join(unreached[:3])}{' ...' if len(unreached) > 3 else ''})"
        )
    if any(is_quantised_experts(module) for module in net.modules()):
        notes.append("HQQ's quantiser for the packed MoE experts (no per-expert calibration)")
    return notes


def quantise_output_head(net: nn.Module, dtype: torch.dtype) -> str:
    """Give the output projection an int8 table (`Int8Head`); returns the head's name.

    When the head was tied to the input embedding, the embedding then reads the same int8 table
    (`Int8Embedding`) and its bf16 table is freed: one table, as before, at half the bytes. An
    untied embedding keeps its own table. A reload installs both after transformers has tied the
    weights (`quant.saved`), so the bf16 tie cannot come back.
    """
    old = net.get_output_embeddings()
    name = module_name(net, old)
    if isinstance(old, Int8Head):
        return name
    embedding = net.get_input_embeddings()
    tied = getattr(embedding, "weight", None) is old.weight
    head = Int8Head.from_weight(old.weight, dtype).to(old.weight.device)
    net.set_output_embeddings(head)
    if tied:
        net.set_input_embeddings(Int8Embedding(head, embed_scale_of(embedding)))
    return name


def _bnb_config(bits: int, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    # transformers matches these from the start of the module name; as regexes they match the
    # name part anywhere ("model.layers.0.router.proj").
    keep = [rf"(.*\.)?{name}(\..*)?$" for name in KEEP]
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=keep,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def _keep_reason(name: str) -> str | None:
    parts = name.split(".")
    for key, why in KEEP.items():
        if key in parts:
            return why
    return None


def _linear_plan(net: nn.Module):
    """(name, module, why kept or None) for each plain nn.Linear still in high precision."""
    for name, module in net.named_modules():
        if type(module) is nn.Linear:
            yield name, module, _keep_reason(name)


def quantise_linears(
    net: nn.Module, codec: Codec, dtype: torch.dtype, hessians: dict | None = None
) -> dict[str, str]:
    """Replace every eligible nn.Linear by a QuantLinear; returns {kept name: why}.

    `hessians` ({name: H}) feed GPTQ; a layer without one gets the codec's plain quantiser.
    """
    hessians = hessians or {}
    skipped = {}
    for name, module, why in list(_linear_plan(net)):
        why = why or codec.fits(module.weight.shape)
        if why:
            skipped[name] = why
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        layer = QuantLinear.from_linear(module, codec, dtype, hessians.get(name))
        setattr(parent, child, layer)
    return skipped


def quantise_all_experts(net: nn.Module, codec: Codec, dtype: torch.dtype) -> dict[str, str]:
    skipped = {}
    for name, module in net.named_modules():
        if not is_packed_experts(module):
            continue
        why = _keep_reason(name) or codec.fits(module.down_proj.shape)
        why = why or codec.fits(module.gate_up_proj.shape)
        if why:
            skipped[name] = why
        else:
            quantise_experts(module, codec, dtype)
    return skipped


def _load_prequantised(path, config, device, dtype):
    """GPTQ, AWQ, compressed-tensors, bitsandbytes, torchao: transformers reads the config."""
    facts = config.quantization_config
    facts = facts if isinstance(facts, dict) else facts.to_dict()
    method = str(facts.get("quant_method", "unknown"))
    bits = int(facts.get("bits") or facts.get("w_bit") or _bits_from_facts(facts))
    net = model_class(config).from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    return net.eval(), build_report(net.eval(), method, bits)


def _bits_from_facts(facts: dict) -> int:
    if facts.get("load_in_4bit"):
        return 4
    if facts.get("load_in_8bit"):
        return 8
    return 16


def _load_tokenizer(path: Path):
    from transformers import AutoProcessor, AutoTokenizer

    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        return AutoProcessor.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
