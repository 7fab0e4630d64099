"""Models and weights: what a model name means, which device and dtype, and quantised loading."""

from quant.device import pick_device, pick_dtype
from quant.resolve import KNOWN_MODELS, ModelNotFoundError, ResolvedModel, resolve_model

__all__ = [
    "KNOWN_MODELS",
    "ModelNotFoundError",
    "ResolvedModel",
    "pick_device",
    "pick_dtype",
    "resolve_model",
]
