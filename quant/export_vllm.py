"""Write a bf16 checkpoint as a 4-bit checkpoint that vLLM serves with its own int4 kernels.

    python -m quant export --model gemma-3-270m [--group-size 32] [--no-head] [--method gptq|rtn]
        [--out DIR]

Why this layout. vLLM 0.32 loads no bitsandbytes, HQQ or GGUF weights, but a checkpoint whose
`quantization_config` says `quant_method: awq` goes, on a CPU, to `AutoAWQConfig` ->
`AutoAWQMarlinLinearMethod` -> `CPUWNA16LinearKernel` (unsigned 4-bit with zero points; inputs and
outputs multiples of 32; an even group size), which runs `int4_scaled_mm_cpu` on AMX CPUs
(`VLLM_CPU_INT4_W4A8`, on by default: activations quantised to int8 on the fly) and
`cpu_gemm_wna16` otherwise; on CUDA the same file goes to AWQ-Marlin. A GPTQ *file* would reach
the same kernel, but vLLM takes only symmetric 4-bit GPTQ files (no zero points); here the GPTQ
*algorithm* chooses the codes and the file is AWQ's. With `lm_head: true` the output head
(`ParallelLMHead`) is quantised too, which matters: the 262144 x 640 head tied to the embedding is
335 MB of the 536 MB a bf16 decode step reads. The head is therefore untied (its own 4-bit copy,
`tie_word_embeddings: false`) while the embedding, a lookup, stays bf16.

How. Every linear layer and the head get 4-bit codes per group of `group_size` consecutive inputs,
asymmetric: a bf16 scale and an integer zero point (0..15) per output row and group. The codes are
chosen by GPTQ (`quant.gptq`: calibrated on standard-library docstrings, `method="gptq"`, the
default) or by round-to-nearest on the min-max grid (`method="rtn"`, no calibration). The
262144-row head, with the one H for all rows, goes ROW_CHUNK rows at a time. On the 270M (4
windows of 256 tokens of the benchmark text, weights dequantised into transformers) perplexity
rises 10% over bf16 with GPTQ (KL 0.09) against 42% with round-to-nearest (KL 0.32); the export
takes 46 s instead of 16 on 2 idle cores (calibration 13 s, GPTQ 22 s; both logged).

Norms, biases and the embedding are copied unchanged. The quantisation facts (format, rounding
method, calibration text, sequences, tokens and the sha256 of its token ids, dampening, clipping,
bits, group size, what was quantised or kept and why, the source's fingerprint, reconstruction
error per projection kind) go into `config.json` under `gemma_stack_quantization`, as
`quant.saved` does.

Exports are cached under `<models dir>/_exports/` in a directory named by the source and the
settings, keyed by the source's weight files (name, size, mtime) and config (and, for GPTQ, the
Python version, whose docstrings are the calibration text), so a second run with the same source
and settings reuses the directory and does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.gptq import (
    BLOCK,
    CLIP_FACTORS,
    DAMP,
    ROW_CHUNK,
    calibrate,
    empty_codes,
    gptq_with_factor,
    inverse_factor,
    one_thread,
)

logger = logging.getLogger(__name__)

EXPORT_VERSION = 2  # bump when the written bytes change for the same source and settings
FACTS_KEY = "gemma_stack_quantization"  # the same key quant.saved / quant.loader read
WEIGHTS_FILE = "model.safetensors"
PACK = 8  # 4-bit codes per int32
# AWQ's GEMM layout puts output column AWQ_ORDER[i] of each group of 8 in nibble i of the int32
# (vLLM's auto_awq.py undoes it with the inverse permutation [0, 4, 1, 5, 2, 6, 3, 7]).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The CPU kernel's constraint (CPUWNA16LinearKernel.can_implement): in and out multiples of 32.
KERNEL_MULTIPLE = 32
# Files beside the weights that a server needs: tokenizer, chat template, generation settings
# (end-of-turn ids), processor configs.
COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "gemma_stack.json"}
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class ExportSettings:
    bits: int = 4
    group_size: int = 32
    quantise_head: bool = True
    method: str = "gptq"  # how the codes are chosen: "gptq" (calibrated) or "rtn"

    def tag(self) -> str:
        head = "head4" if self.quantise_head else "tied"
        return f"awq-w{self.bits}-g{self.group_size}-{head}-{self.method}"


class ExportError(ValueError):
    """A checkpoint or setting this exporter cannot write; the message says which and why."""


def unsupported_reason(model_path: Path, settings: ExportSettings | None = None) -> str | None:
    """Why `model_path` cannot be exported for vLLM's int4 kernels, or None when it can.

    Read from config.json and the file list only (no weights, no model import), so the server can
    decide its engine quickly; `export` checks every layer again when it writes.
    """
    settings = settings or ExportSettings()
    if settings.method not in METHODS:
        return f"method={settings.method!r}: the export chooses codes by {' or '.join(METHODS)}"
    if settings.bits != 4:
        return f"{settings.bits}-bit: vLLM's CPU int4 kernel takes 4-bit weights only"
    if settings.group_size % 2 or settings.group_size < 2:
        return f"group_size={settings.group_size}: vLLM's CPU int4 kernel needs an even group"
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        return f"{model_path} has no config.json"
    config = json.loads(config_file.read_text())
    if config.get("quantization_config") or config.get(FACTS_KEY):
        return "the checkpoint is already quantised; serve it as it is (bits 16)"
    for key in ("vision_config", "audio_config"):
        if config.get(key):
            return f"it has a {key.split('_')[0]} tower; the export covers text-only models"
    text = config.get("text_config") or config
    if any(text.get(key) for key in ("num_experts", "num_local_experts", "enable_moe_block")):
        return "mixture-of-experts layers (packed expert tensors) are not exported"
    if not any(Path(model_path).glob("*.safetensors")):
        return "the weights are not safetensors"
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    sizes = {
        "hidden_size": text["hidden_size"],
        "intermediate_size": text.get("intermediate_size", KERNEL_MULTIPLE),
        "query width (heads x head_dim)": head_dim * text["num_attention_heads"],
        "key/value width": head_dim * text.get("num_key_value_heads", 1),
        "vocab_size": text["vocab_size"],
    }
    multiple = np.lcm(KERNEL_MULTIPLE, settings.group_size)
    for name, size in sizes.items():
        if size % multiple:
            return (
                f"{name}={size} is not a multiple of {multiple} (the kernel's 32 and the group "
                f"size {settings.group_size})"
            )
    return None


def export(
    model: str | Path,
    settings: ExportSettings | None = None,
    root: Path | None = None,
    out: Path | None = None,
) -> Path:
    """The 4-bit export of `model` (a name, checkpoint dir or .gguf), written if missing.

    By default it is cached under `root` (the models directory); `out` writes it there instead,
    once (an existing `out` is refused rather than overwritten).
    """
    from quant.resolve import models_dir, resolve_model

    settings = settings or ExportSettings()
    resolved = resolve_model(str(model))
    reason = unsupported_reason(resolved.path, settings)
    if reason:
        raise ExportError(f"{resolved.path} cannot be exported for vLLM: {reason}")
    if out is not None:
        if Path(out).exists():
            raise ExportError(f"out={str(out)!r} exists; remove it or choose another directory")
        return write_export(resolved.path, Path(out), settings, name=resolved.name)
    key = source_key(resolved.path, settings)
    target = (root or models_dir()) / "_exports" / f"{resolved.name}-{settings.tag()}-{key[:12]}"
    if (target / "config.json").exists():
        logger.info("4-bit export of %s found at %s; reusing it", resolved.name, target)
        return target
    write_export(resolved.path, target, settings, name=resolved.name)
    return target


def source_key(source: Path, settings: ExportSettings) -> str:
    """A key that changes when the source's weights, its config or the settings change.

    Weight files are keyed by name, size and mtime rather than hashed, so finding a cached export
    costs milliseconds; the content hash is computed once, at export, and kept in the facts. A
    GPTQ export is keyed by the Python version too: its calibration text comes from the stdlib.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([EXPORT_VERSION, asdict(settings)]).encode())
    if settings.method == "gptq":  # the calibration text is this Python's docstrings
        digest.update(platform.python_version().encode())
    digest.update((source / "config.json").read_bytes())
    for file in sorted(source.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def write_export(source: Path, out_dir: Path, settings: ExportSettings, name: str) -> Path:
    """Quantise `source` into `out_dir`, atomically (a staging directory renamed at the end)."""
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is read by other users
    try:
        tensors, facts = quantise_checkpoint(source, settings)
        facts["source"] = {
            "name": name,
            "path": str(source),
            "weights_sha256": _weights_sha256(source),
        }
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        del tensors
        _copy_side_files(source, staging)
        _write_config(source, staging, settings, facts)
        try:
            staging.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
            logger.info("another process wrote %s first; keeping its copy", out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "exported %s to %d-bit (group %d, head %s) at %s in %.0f s", name, settings.bits,
        settings.group_size, facts["head"], out_dir, time.monotonic() - started,
    )  # fmt: skip
    return out_dir


def quantise_checkpoint(source: Path, settings: ExportSettings) -> tuple[dict, dict]:
    """(tensors to save, facts) for `source`: linear layers and head packed, the rest as is."""
    config = json.loads((source / "config.json").read_text())
    linears, head_name, embed_name = _plan(source)
    hessians, calibration = {}, None
    if settings.method == "gptq":
        targets = linears | ({head_name} if settings.quantise_head else set())
        hessians, calibration = calibrate(source, targets)  # before the weights are read: memory
    chooser = _Chooser(settings, hessians)
    tensors: dict[str, torch.Tensor] = {}
    quantised, kept, errors = [], {}, {}
    source_tensors = _read_all(source)
    head_weight_key = f"{head_name}.weight"
    tied = head_weight_key not in source_tensors
    for key, tensor in source_tensors.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in linears:
            tensors.update(_quantised_parts(module, tensor, chooser, errors))
            quantised.append(module)
        elif key == head_weight_key and not settings.quantise_head:
            tensors[key] = tensor  # an untied bf16 head, kept as the source has it
        elif key != head_weight_key:
            tensors[key] = tensor
            if tensor.ndim >= 1 and key.endswith(".weight"):
                kept[module] = _why_kept(module, embed_name)
    if settings.quantise_head:
        weight = source_tensors[head_weight_key if not tied else f"{embed_name}.weight"]
        tensors.update(_quantised_parts(head_name, weight, chooser, errors))
        quantised.append(head_name)
    elif tied:
        kept[head_name] = "output head tied to the bf16 embedding (quantise_head off)"
    chooser.log_time()
    facts = {
        "method": "awq",
        "format": "AWQ GEMM layout (qweight/qzeros int32 packed along outputs, bf16 scales)",
        "rounding": settings.method,
        "scheme": _scheme(settings),
        "calibration": calibration,
        "gptq": {
            "dampening": DAMP,
            "block": BLOCK,
            "act_order": False,
            "clip_factors": list(CLIP_FACTORS),
        }
        if settings.method == "gptq"
        else None,
        "bits": settings.bits,
        "group_size": settings.group_size,
        "zero_point": True,
        "codec": "uint4 with zero points",
        "compute_dtype": str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
        "quantised": sorted(quantised),
        "skipped": dict(sorted(kept.items())),
        "head": f"int{settings.bits}" if settings.quantise_head else "tied",
        "head_module": head_name,
        "head_was_tied": tied,
        "embedding": f"{embed_name} kept bf16 (a lookup reads one row per token)",
        "reconstruction": _summarise(errors),
        "exporter": f"quant.export_vllm v{EXPORT_VERSION}",
        "library": f"torch {version('torch')}",
        "served_by": "vLLM: quant_method awq -> CPUWNA16LinearKernel on CPU, AWQ-Marlin on CUDA",
    }
    return tensors, facts


def _scheme(settings: ExportSettings) -> str:
    grid = f"asymmetric min-max per group of {settings.group_size} inputs, integer zero points"
    if settings.method == "rtn":
        return f"round-to-nearest, {grid}, no calibration data"
    return (
        f"GPTQ (Frantar et al. 2022), {grid}, each group's grid from its error-updated weights; "
        f"columns in order (no act-order), blocks of {BLOCK}, dampening {DAMP} x mean(diag H)"
    )


class _Chooser:
    """Chooses one module's codes: round-to-nearest, or GPTQ with that module's Hessian.

    Modules that read one input (q/k/v, gate/up) share one Hessian object, so its inverse
    factor is computed once for them all.
    """

    def __init__(self, settings: ExportSettings, hessians: dict[str, torch.Tensor]):
        self.settings = settings
        self.hessians = hessians
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds = 0.0

    def __call__(self, module: str, weight: torch.Tensor):
        started = time.monotonic()
        group, bits = self.settings.group_size, self.settings.bits
        if self.settings.method == "rtn":
            chosen = quantise_rtn(weight, group, bits)
        else:
            hessian = self.hessians[module]
            with one_thread():
                if id(hessian) not in self.factors:
                    self.factors[id(hessian)] = inverse_factor(hessian, DAMP)
                factor, dead = self.factors[id(hessian)]
                chosen = gptq_with_factor(weight, factor, dead, group, bits, CLIP_FACTORS)
        self.seconds += time.monotonic() - started
        return chosen

    def log_time(self) -> None:
        logger.info("%s took %.0f s", self.settings.method.upper(), self.seconds)


def quantise_rtn(weight: torch.Tensor, group_size: int, bits: int = 4):
    """Round-to-nearest asymmetric codes for a (out, in) weight, per row and group of inputs.

    Returns (codes uint8 (out, in), scales bf16 (out, in / group), zeros uint8 (out, in / group))
    with weight ~= (codes - zeros) * scales.
    """
    top = 2**bits - 1
    rows, cols = weight.shape
    codes, scales, zeros = empty_codes(rows, cols, group_size)
    for begin in range(0, rows, ROW_CHUNK):
        block = weight[begin : begin + ROW_CHUNK].float()
        groups = block.reshape(block.shape[0], -1, group_size)
        low = groups.amin(-1, keepdim=True)
        high = groups.amax(-1, keepdim=True)
        # Round the scale to bf16 first: the codes must fit the scale vLLM will multiply by.
        # A constant group (high == low) gets a tiny scale and codes that reproduce it.
        scale = ((high - low) / top).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (-low / scale).round().clamp(0, top)
        code = ((groups / scale).round() + zero).clamp(0, top)
        end = begin + block.shape[0]
        codes[begin:end] = code.reshape(block.shape).to(torch.uint8)
        scales[begin:end] = scale.squeeze(-1).to(torch.bfloat16)
        zeros[begin:end] = zero.squeeze(-1).to(torch.uint8)
    return codes, scales, zeros


def dequantise(codes, scales, zeros, group_size: int) -> torch.Tensor:
    """(codes - zeros) * scales as fp32, the (out, in) weight the codes stand for."""
    rows, cols = codes.shape
    grouped = codes.reshape(rows, -1, group_size).float() - zeros.float()[..., None]
    return (grouped * scales.float()[..., None]).reshape(rows, cols)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit codes -> (rows, cols / 8) int32 in AWQ's nibble order."""
    rows, cols = values.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    out = np.empty((rows, cols // PACK), dtype=np.int32)
    step = max(1, (1 << 24) // cols)  # rows per pass: int64 temporaries of ~128 MB at most
    for begin in range(0, rows, step):
        block = values[begin : begin + step].to(torch.int64)
        nibbles = block.reshape(block.shape[0], cols // PACK, PACK)[..., list(AWQ_ORDER)]
        words = (nibbles << shifts).sum(-1)
        # Stored as int32 bit patterns: words above 2**31 wrap, as AWQ's packers write them.
        out[begin : begin + step] = words.numpy().astype(np.uint32).view(np.int32)
    return torch.from_numpy(out)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_awq: (rows, cols / 8) int32 -> (rows, cols) uint8 codes."""
    rows, words = packed.shape
    raw = torch.from_numpy(packed.numpy().view(np.uint32).astype(np.int64))
    nibbles = (raw[..., None] >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    inverse = [AWQ_ORDER.index(column) for column in range(PACK)]
    return nibbles[..., inverse].reshape(rows, words * PACK).to(torch.uint8)


def dequantised_state(path: Path) -> dict[str, torch.Tensor]:
    """The bf16 state dict an export stands for (linear layers and head unpacked), untied.

    What vLLM multiplies by, as plain weights a transformers model can load: for measuring the
    export's quality against its source; vLLM's int8 activations (W4A8) are not reproduced.
    """
    config = json.loads((Path(path) / "config.json").read_text())
    group_size = int(config[FACTS_KEY]["group_size"])
    tensors = _read_all(Path(path))
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".qweight"):
            module = key.removesuffix(".qweight")
            codes = unpack_awq(tensor).T  # AWQ stores (in, out)
            zeros = unpack_awq(tensors[f"{module}.qzeros"]).T
            scales = tensors[f"{module}.scales"].T
            weight = dequantise(codes, scales, zeros, group_size)
            out[f"{module}.weight"] = weight.to(torch.bfloat16)
        elif not key.endswith((".qzeros", ".scales")):
            out[key] = tensor
    return out


def _quantised_parts(module: str, weight: torch.Tensor, chooser: _Chooser, errors) -> dict:
    settings = chooser.settings
    rows, cols = weight.shape
    if rows % KERNEL_MULTIPLE or cols % np.lcm(KERNEL_MULTIPLE, settings.group_size):
        raise ExportError(
            f"{module}: shape {tuple(weight.shape)} does not fit vLLM's CPU int4 kernel (in and "
            f"out multiples of 32, in a multiple of the group size {settings.group_size})"
        )
    codes, scales, zeros = chooser(module, weight)
    _record_error(errors, module, weight, codes, scales, zeros, settings.group_size)
    # AWQ keeps (in, out): codes and zero points packed along the output dimension.
    return {
        f"{module}.qweight": pack_awq(codes.T.contiguous()),
        f"{module}.qzeros": pack_awq(zeros.T.contiguous()),
        f"{module}.scales": scales.T.contiguous(),
    }


def _record_error(errors, module, weight, codes, scales, zeros, group_size) -> None:
    """Squared error, squared norm, exact matches (in bf16) and count, per projection kind."""
    kind = module.rsplit(".", 1)[-1]
    sums = errors.setdefault(kind, [0.0, 0.0, 0, 0])
    for begin in range(0, weight.shape[0], ROW_CHUNK):
        end = begin + ROW_CHUNK
        original = weight[begin:end].float()
        rebuilt = dequantise(codes[begin:end], scales[begin:end], zeros[begin:end], group_size)
        sums[0] += (rebuilt - original).square().sum().item()
        sums[1] += original.square().sum().item()
        sums[2] += (rebuilt.to(torch.bfloat16) == weight[begin:end]).sum().item()
        sums[3] += original.numel()


def _summarise(errors) -> dict:
    return {
        kind: {
            "relative_rmse": round((err / norm) ** 0.5, 5) if norm else 0.0,
            "exact_fraction": round(exact / count, 4),
        }
        for kind, (err, norm, exact, count) in sorted(errors.items())
    }


def _plan(source: Path) -> tuple[set[str], str, str]:
    """(linear layers to quantise, head module, embedding module), from the model built on meta."""
    from transformers import AutoConfig

    from quant.loader import model_class
    from quant.moe import is_packed_experts

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        net = model_class(config)._from_config(config)
    head = net.get_output_embeddings()
    embed = net.get_input_embeddings()
    names = {module: name for name, module in net.named_modules()}
    if any(is_packed_experts(module) for module in names):
        raise ExportError("mixture-of-experts layers (packed expert tensors) are not exported")
    linears = {
        name
        for module, name in names.items()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return linears, names[head], names[embed]


def _why_kept(module: str, embed_name: str) -> str:
    if module == embed_name:
        return "input embedding: a lookup of one row per token, kept bf16"
    if "norm" in module.rsplit(".", 1)[-1]:
        return "normalisation weight, kept in high precision"
    return "not a linear layer, kept as the source has it"


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[key] = handle.get_tensor(key)
    return tensors


def _weights_sha256(source: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(source.glob("*.safetensors")):
        with file.open("rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
    return digest.hexdigest()


def _copy_side_files(source: Path, staging: Path) -> None:
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in COPIED_SUFFIXES and file.name not in NOT_COPIED:
            shutil.copy(file, staging / file.name)


def _write_config(source: Path, staging: Path, settings: ExportSettings, facts: dict) -> None:
    config = json.loads((source / "config.json").read_text())
    if settings.quantise_head:
        config["tie_word_embeddings"] = False  # the head has its own 4-bit copy
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": settings.bits,
        "group_size": settings.group_size,
        "zero_point": True,
        "version": "gemm",
        "lm_head": settings.quantise_head,
        # Named explicitly (vLLM otherwise infers it from dtypes in the file): nothing that is
        # a linear layer is left in bf16, only the embedding and the norms.
        "modules_to_not_convert": sorted(name for name in facts["skipped"] if "embed" in name)
        or None,
    }
    config[FACTS_KEY] = facts
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
