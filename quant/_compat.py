"""Workarounds for dependency bugs, each with the version that lets it go.

Applied once by `apply()` (the loader calls it before any load). `processors_without_torchvision`
is also run on its own by the vLLM plugin (serve/_compat.py), by the tiny-checkpoint builder and
by tests that load a processor, since they load processors without going through `load`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import sys
import types
from importlib.metadata import version
from pathlib import Path

logger = logging.getLogger(__name__)
_applied = False


def apply() -> None:
    global _applied
    if not _applied:
        _bnb_cpu_unpack_absmax()
        _bnb_int8_cast_warning_once()
        processors_without_torchvision()
        _applied = True


class _FirstOfEachMessage(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.msg not in self.seen
        self.seen.add(record.msg)
        return first


def _bnb_int8_cast_warning_once() -> None:
    """bitsandbytes 0.50.2 logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to
    float16" at WARNING on every int8 matmul, hundreds per generated token, which buries a
    server's log. It is said once here. Remove when bitsandbytes logs it once itself."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_FirstOfEachMessage())


def _bnb_cpu_unpack_absmax() -> None:
    """bitsandbytes 0.50.2: undoing the CPU NF4 repacking leaves `absmax` transposed.

    On the CPU the first forward of a Linear4bit repacks its weight and stores absmax as a
    [in / blocksize, out] bf16 matrix. Saving (`_save_to_state_dict`) undoes the repacking, but
    `_convert_weight_packed_for_cpu_inverse` restores absmax only for nested quantisation; the
    plain case keeps the transposed matrix, so the saved checkpoint, and the model's own next
    forward, scramble the scales of every layer with more than one block per row. Here the
    inverse is completed (transpose back, flatten, float32 as the forward path expects).
    Remove when a bitsandbytes release after 0.50.2 round-trips it (tests/test_quant_saved.py
    saves after a forward and compares outputs).
    """
    try:
        installed = version("bitsandbytes")
    except Exception:  # not installed (e.g. macOS): nothing to patch
        return
    if tuple(int(part) for part in installed.split(".")[:3] if part.isdigit()) > (0, 50, 2):
        return
    import bitsandbytes.functional as functional
    import bitsandbytes.nn.modules as modules

    original = functional._convert_weight_packed_for_cpu_inverse

    @functools.wraps(original)
    def inverse(packed_weight, quant_state, *args, **kwargs):
        nested = getattr(quant_state, "original_nested", False)
        qweight, state = original(packed_weight, quant_state, *args, **kwargs)
        if not nested and state.absmax.dim() == 2:
            state.absmax = state.absmax.T.reshape(-1).float().contiguous()
        return qweight, state

    functional._convert_weight_packed_for_cpu_inverse = inverse
    modules._convert_weight_packed_for_cpu_inverse = inverse
    logger.debug("patched bitsandbytes %s CPU NF4 unpacking (absmax layout)", installed)


def aligned_for_int8_mm(tensor):
    """torch 2.13 CPU: `_weight_int8pack_mm` segfaults on an int8 weight whose storage is not
    freshly allocated (seen with a tensor read from safetensors, whose data sits at an offset
    into the file's buffer). A copy gets an allocator-aligned buffer. Remove when a torch release
    runs quant.codecs.Int8Head on a reloaded checkpoint without the copy
    (tests/test_quant_moe.py::test_save_reload_same_outputs)."""
    return tensor.clone()


# -- transformers 5.19 without torchvision ------------------------------------------------------
#
# No torchvision build on the package index matches torch 2.13.0+cpu (its operators fail to
# register on import), so scripts/install.sh removes it. transformers then uses its PIL-backed image
# processors, except in two places that still need torchvision for image and audio input alone.
# Remove both when a torchvision build for the installed torch exists on the index (nothing here
# runs when torchvision imports).

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


def processors_without_torchvision() -> None:
    """Make Gemma 3 / Gemma 4 processors importable and loadable without torchvision; safe to call
    more than once, and does nothing where torchvision imports."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    _image_processor_twins()
    _video_processor_stand_in()


def _image_processor_twins() -> None:
    """vLLM's gemma3_mm and gemma4_mm, and transformers' own processing_gemma4, import the
    torchvision-backed image processor modules, which import torchvision at the top. The missing
    modules are stood in by their PIL twins, under the names imported; the importers use the
    classes for annotations and for helpers both twins define."""
    for missing, (pil_name, renames) in _PIL_TWINS.items():
        if missing in sys.modules:
            continue
        try:
            pil = importlib.import_module(pil_name)
        except ImportError:  # an older transformers without this model: nothing to stand in for
            continue
        stand_in = types.ModuleType(
            missing, f"PIL-backed stand-in for {missing} (quant/_compat.py)"
        )
        stand_in.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        for name, twin in renames.items():
            setattr(stand_in, name, getattr(pil, twin))
        sys.modules[missing] = stand_in
        logger.debug("torchvision is missing: %s stands in for %s", pil_name, missing)


def _video_processor_stand_in() -> None:
    """Gemma4Processor (image, audio and video) cannot be built or loaded without torchvision,
    even for images and audio alone: it requires a video processor, every video processor needs
    torchvision, and transformers then exports neither `VideoProcessorMixin` (which the processor
    checks its argument against) nor `AutoVideoProcessor` (which loads it).

    Here a checkpoint's video processor loads as `NoVideoProcessor`: it keeps the saved settings
    (so a checkpoint saved here still names the real class, and loads it where torchvision
    exists) and refuses video input with the reason. The server never sends video."""
    import transformers.processing_utils as processing
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(processing.transformers_module, "VideoProcessorMixin"):
        processing.transformers_module.VideoProcessorMixin = VideoProcessorMixin
    names = processing._LazyAutoProcessorMapping._MAPPING_NAMES
    names["video_processor"] = (__name__, NoVideoProcessorLoader.__name__)


class NoVideoProcessorLoader:
    """Stands in for AutoVideoProcessor where torchvision is missing."""

    @classmethod
    def from_pretrained(cls, path, subfolder: str = "", **_kwargs):
        folder = Path(path) / subfolder
        settings: dict = {}
        if (folder / "processor_config.json").exists():
            saved = json.loads((folder / "processor_config.json").read_text())
            settings = saved.get("video_processor") or {}
        elif (folder / "video_preprocessor_config.json").exists():
            settings = json.loads((folder / "video_preprocessor_config.json").read_text())
        return no_video_processor(settings)


def no_video_processor(settings: dict):
    """A video processor that keeps `settings` (saved as they are) and refuses every video."""
    return _no_video_processor_class()(settings)


@functools.cache
def _no_video_processor_class() -> type:
    from transformers.video_processing_utils import VideoProcessorMixin

    class NoVideoProcessor(VideoProcessorMixin):
        def __init__(self, saved: dict):
            super().__init__()
            self.saved = dict(saved)

        def to_dict(self) -> dict:
            return dict(self.saved)

        def __call__(self, *args, **kwargs):
            raise ValueError(
                "video input needs torchvision, which is not installed (no build matches this "
                "torch); send images or audio instead"
            )

        preprocess = __call__

    return NoVideoProcessor
