"""Models and weights: what a model name means, which device and dtype, and quantised loading."""

from quant.device import pick_device, pick_dtype
from quant.loader import LoadedModel, LoadError, load
from quant.resolve import KNOWN_MODELS, ModelNotFoundError, ResolvedModel, resolve_model
from quant.saved import save_quantised

__all__ = [
    "KNOWN_MODELS",
    "LoadError",
    "LoadedModel",
    "ModelNotFoundError",
    "ResolvedModel",
    "load",
    "pick_device",
    "pick_dtype",
    "resolve_model",
    "save_quantised",
]
