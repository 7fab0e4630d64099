"""Shared fixtures: the real server on the real Gemma 3 270M, started once per test session.

The server runs as `python -m serve` in a subprocess on a free loopback port, exactly as a user
starts it, with an API key, an adapters directory and a media directory so that every suite
(chat, adapters, media, security) can drive the same process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
MODEL = "gemma-3-270m"
STARTUP_SECONDS = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    process: subprocess.Popen
    log_path: Path
    adapters_dir: Path | None = None
    media_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start_server(args: list[str], log_path: Path, env: dict | None = None) -> RunningServer:
    """Start `python -m serve ARGS` on a free port and wait until /health answers 200."""
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}:\n{log_path.read_text()[-8000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                api_key = args[args.index("--api-key") + 1] if "--api-key" in args else None
                return RunningServer(url, api_key, process, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError(
        f"server did not become healthy in {STARTUP_SECONDS} s:\n{log_path.read_text()[-5000:]}"
    )


def stop_server(process: subprocess.Popen, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    """The real model behind the real server, shared by every test that needs it."""
    root = tmp_path_factory.mktemp("server")
    adapters_dir = root / "adapters"
    media_dir = root / "media"
    adapters_dir.mkdir()
    media_dir.mkdir()
    running = start_server(
        [
            "--model", MODEL,
            "--api-key", API_KEY,
            "--max-model-len", "32768",
            "--adapters-dir", str(adapters_dir),
            "--allowed-media-dir", str(media_dir),
            "--max-lora-rank", "16",
            # 1 GiB holds a full 32K-token request of the 270M many times over, and keeps
            # several test servers within this machine's memory.
            "--cpu-kv-cache-gib", "1",
        ],
        root / "server.log",
    )  # fmt: skip
    running.adapters_dir = adapters_dir
    running.media_dir = media_dir
    yield running
    stop_server(running.process)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as session:
        yield session


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from quant.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MODEL).path)
