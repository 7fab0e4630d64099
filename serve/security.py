"""Checks that keep the server from running what it should not: pickled weights, above all."""

from __future__ import annotations

from pathlib import Path


class UnsafeWeightsError(ValueError):
    pass


def check_weights_format(model_path: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint that has only pickled `.bin` weights unless the user allows it:
    unpickling runs arbitrary code from the file."""
    has_safetensors = any(model_path.glob("*.safetensors"))
    pickled = sorted(p.name for p in model_path.glob("*.bin") if "training_args" not in p.name)
    if pickled and not has_safetensors and not allow_pickle:
        raise UnsafeWeightsError(
            f"{model_path} holds only pickled weights ({', '.join(pickled)}); loading them can run "
            "code from the file. Convert them to safetensors, or pass --allow-pickle if you trust "
            "their source."
        )
