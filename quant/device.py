"""Which device a model runs on and in which dtype: decided here once for serve, train and bench.

Gemma's activations overflow float16 (NaNs or empty answers), so the policy is bf16 where the device
computes it and fp32 otherwise; float16 is refused outright.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class DeviceError(ValueError):
    """A device or dtype that cannot be used, with the reason and what to pass instead."""


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then Apple's MPS, then the CPU; a forced choice that is not present is an error."""
    if preference not in DEVICES:
        raise DeviceError(f"device={preference!r} is not one of {', '.join(DEVICES)}")

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if preference == "auto":
        chosen = next(name for name in ("cuda", "mps", "cpu") if available[name])
        return torch.device(chosen)

    if not available[preference]:
        present = ", ".join(name for name, ok in available.items() if ok)
        raise DeviceError(
            f"device={preference!r} was asked for but is not available here (present: {present}); "
            "pass device='auto' to use the best one present"
        )
    return torch.device(preference)


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        # MPS gained bf16 with macOS 14; a tiny op tells us without parsing OS versions.
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device).sum().item()
            return True
        except (RuntimeError, TypeError):
            return False
    return True


def pick_dtype(device: torch.device, requested: str | torch.dtype | None = "auto") -> torch.dtype:
    """bf16 where the device has it, fp32 otherwise; float16 is refused for Gemma."""
    if isinstance(requested, str):
        if requested not in DTYPES:
            raise DeviceError(
                f"dtype={requested!r} is not one of {', '.join(sorted(DTYPES))}; use 'auto'"
            )
        requested = DTYPES[requested]

    if requested == torch.float16:
        raise DeviceError(
            "dtype=float16 is refused for Gemma: its activations overflow float16 and the model "
            "returns NaNs or empty text. Use dtype='bfloat16' (or 'auto', which falls back to "
            "float32 where the device has no bf16)."
        )
    if requested is not None:
        return requested

    if supports_bf16(device):
        return torch.bfloat16
    logger.warning("%s has no bfloat16 support; using float32 (never float16 for Gemma)", device)
    return torch.float32
