"""Hand a finished adapter to a running server, over HTTP only (train/ never imports serve/).

The server loads adapters from its own adapters directory, so the adapter is copied there first
(`serve.adapters_dir`) unless it already lies inside it; then `POST /v1/load_lora_adapter`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from train.manifest import replace_dir

logger = logging.getLogger(__name__)


class RegisterError(RuntimeError):
    """The server refused or could not be reached; the message carries its answer."""


@dataclass
class Registered:
    status: int
    body: str
    lora_name: str
    lora_path: str


def place_adapter(adapter_dir: Path, adapters_dir: str | None, name: str) -> Path:
    """Where the server will read the adapter: copied atomically into adapters_dir/name."""
    adapter_dir = Path(adapter_dir).resolve()
    if adapters_dir is None:
        return adapter_dir
    root = Path(adapters_dir).expanduser().resolve()
    if adapter_dir.is_relative_to(root):
        return adapter_dir
    target = root / name
    staging = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter_dir, staging)
    replace_dir(staging, target)
    logger.info("adapter copied to %s", target)
    return target


def register(
    url: str, name: str, path: Path, api_key: str | None = None, timeout_s: float = 120.0
) -> Registered:
    endpoint = url.rstrip("/") + "/v1/load_lora_adapter"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"lora_name": name, "lora_path": str(path)}
    logger.info("registering adapter %r with %s", name, endpoint)
    try:
        response = httpx.post(endpoint, json=payload, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise RegisterError(
            f"could not reach {endpoint} ({type(error).__name__}: {error}); is the server "
            "running, and started with adapter loading enabled?"
        ) from error

    body = response.text.strip()
    if response.status_code >= 400:
        kind = "refused the adapter" if response.status_code < 500 else "failed"
        raise RegisterError(
            f"the server {kind}: HTTP {response.status_code} from POST {endpoint} "
            f"with lora_name={name!r}, lora_path={str(path)!r}:\n{body}"
        )
    return Registered(response.status_code, body, name, str(path))
