"""Workarounds for dependency bugs, each with the version that lets it go.

Applied once by `apply()` (the loader calls it before any quantised load).
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import version

logger = logging.getLogger(__name__)
_applied = False


def apply() -> None:
    global _applied
    if not _applied:
        _bnb_cpu_unpack_absmax()
        _applied = True


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
