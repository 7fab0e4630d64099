"""What a run leaves behind, and the contract with the server.

`<output_dir>/adapter/` is a PEFT-standard adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus `gemma_stack_adapter.json`, the manifest. The server reads the
manifest to refuse an adapter trained on other weights or with another chat template:

    format                 "gemma-stack-adapter/1"
    name                   the adapter's name (what `lora_name` is registered as)
    base_model             name, path, architecture, model_type, load_in, and `weights`:
                           {"algorithm": "sha256", "files": {file: hex}, "digest": hex}; with a
                           single weights file `digest` is that file's own sha256
    tokenizer              chat_template_sha256 (of the template text), bos/eos/pad ids,
                           stop_token_ids, vocab_size
    lora                   r, alpha, dropout, target_modules, target_parameters as trained
    data                   per split: examples, tokens, trained_tokens, truncated, fingerprint
                           (sha256 of the token ids and loss masks)
    config                 the resolved training config
    metrics                final train_loss, eval_loss, steps, runtime_s, train_tokens_per_s
    versions, created      library versions; UTC time of writing

The adapter directory is written beside its final place and renamed into it, so a reader never
sees a half-written adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from quant.resolve import models_dir

logger = logging.getLogger(__name__)

MANIFEST = "gemma_stack_adapter.json"
FORMAT = "gemma-stack-adapter/1"


def _cache_file() -> Path:
    return models_dir().parent / "weights_sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, cached by (path, size, mtime) so a 500 MB file is read once."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]

    started = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    logger.info(
        "sha256 of %s in %.1f s (cached in %s)",
        path.name,
        time.perf_counter() - started,
        cache_path,
    )
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(cache_path)
    return cache[key]


def weights_fingerprint(model_dir: Path) -> dict[str, Any]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors or *.bin weights")
    hashes = {f.name: file_sha256(f) for f in files}
    if len(hashes) == 1:
        digest = next(iter(hashes.values()))
    else:
        lines = "".join(f"{name} {h}\n" for name, h in hashes.items())
        digest = hashlib.sha256(lines.encode()).hexdigest()
    return {"algorithm": "sha256", "files": hashes, "digest": digest}


def tokenizer_facts(policy) -> dict[str, Any]:
    tokenizer = policy.tokenizer
    template = tokenizer.chat_template or ""
    return {
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": policy.stop_token_ids,
        "vocab_size": len(tokenizer),
    }


def build_manifest(*, name, base, policy, peft_config, data, config, metrics) -> dict[str, Any]:
    model_config = base.model.config
    return {
        "format": FORMAT,
        "name": name,
        "base_model": {
            "name": base.resolved.name,
            "path": str(base.resolved.path),
            "architecture": type(base.model).__name__,
            "model_type": model_config.model_type,
            "load_in": base.load_in,
            "weights": weights_fingerprint(base.resolved.path),
        },
        "tokenizer": tokenizer_facts(policy),
        "lora": {
            "r": peft_config.r,
            "alpha": peft_config.lora_alpha,
            "dropout": peft_config.lora_dropout,
            "target_modules": _jsonable(peft_config.target_modules),
            "target_parameters": _jsonable(peft_config.target_parameters),
        },
        "data": {
            "train": data.train.stats(),
            "eval": data.eval.stats() if data.eval else None,
        },
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "trl")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _jsonable(value):
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def publish_adapter(peft_model, manifest: dict[str, Any], target: Path) -> Path:
    """Save into a temporary directory beside `target`, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(staging, safe_serialization=True)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    replace_dir(staging, target)
    logger.info("adapter written to %s", target)
    return target


def replace_dir(staging: Path, target: Path) -> None:
    """rename() cannot replace a non-empty directory, so an old one is moved aside first."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / MANIFEST).read_text())
