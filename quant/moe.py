"""Mixture-of-experts weights: Gemma 4 keeps its experts as packed 3-D parameters.

`experts.gate_up_proj` is [experts, 2 * intermediate, hidden] and `experts.down_proj` is
[experts, hidden, intermediate]; they are `nn.Parameter`s, not `nn.Linear`, so quantisers that
replace linear layers pass over them silently, leaving most of an MoE model's weights at bf16.
Here each one is stored through the same codec as the linear layers and decoded on access: the
experts module's class is swapped for a subclass whose `gate_up_proj` / `down_proj` are properties,
so the model's own forward (and any experts implementation transformers dispatches to) is unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quant.codecs import Codec

logger = logging.getLogger(__name__)

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_SUBCLASSES: dict[type, type] = {}


def is_packed_experts(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
        for name in EXPERT_PARAMETERS
    )


def is_quantised_experts(module: nn.Module) -> bool:
    return hasattr(module, "_quant_experts")


def quantise_experts(module: nn.Module, codec: Codec, dtype: torch.dtype) -> None:
    """Replace the module's 3-D expert parameters with the codec's storage, in place."""
    encoded = {}
    for name in EXPERT_PARAMETERS:
        weight = module._parameters[name]
        encoded[name] = (weight.shape, codec.encode(weight, dtype))
    install_expert_storage(module, codec, dtype, encoded)


def install_expert_storage(
    module: nn.Module,
    codec: Codec,
    dtype: torch.dtype,
    encoded: dict[str, tuple[torch.Size, dict[str, torch.Tensor]]],
) -> None:
    """Swap the module to its quantised subclass holding `encoded` storage (also used on reload)."""
    for name, (shape, parts) in encoded.items():
        module._parameters.pop(name, None)
        for part, tensor in parts.items():
            module.register_buffer(f"{name}_{part}", tensor)
        encoded[name] = (torch.Size(shape), tuple(parts))
    module._quant_experts = {"codec": codec, "dtype": dtype, "layout": encoded}
    module.__class__ = _quantised_subclass(type(module))


def expert_storage(module: nn.Module) -> dict[str, tuple[torch.Size, dict[str, torch.Tensor]]]:
    layout = module._quant_experts["layout"]
    return {
        name: (shape, {part: getattr(module, f"{name}_{part}") for part in parts})
        for name, (shape, parts) in layout.items()
    }


def decode_experts(module: nn.Module) -> dict[str, torch.Tensor]:
    state = module._quant_experts
    return {
        name: state["codec"].decode(parts, shape, state["dtype"])
        for name, (shape, parts) in expert_storage(module).items()
    }


def _decoded(name: str):
    def getter(self: nn.Module) -> torch.Tensor:
        # Inside forward the weights were decoded once for the whole call; the model indexes
        # them once per expert hit, and decoding per index would repeat the work per expert.
        current = self.__dict__.get("_decoded_now")
        if current is not None:
            return current[name]
        return decode_experts(self)[name]

    return property(getter)


def _forward_with_decoded(base: type):
    def forward(self: nn.Module, *args, **kwargs):
        self.__dict__["_decoded_now"] = decode_experts(self)
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_decoded_now"] = None

    return forward


def _quantised_subclass(base: type) -> type:
    if base not in _SUBCLASSES:
        members = {name: _decoded(name) for name in EXPERT_PARAMETERS}
        members["forward"] = _forward_with_decoded(base)
        _SUBCLASSES[base] = type(f"Quantised{base.__name__}", (base,), members)
    return _SUBCLASSES[base]
