"""The servers the benchmarks measure, started and stopped the same way by every script.

A server runs in its own session (process group), so that what it spawns (vLLM's engine core and
its workers) is killed with it and cannot hold the cores through the next measurement. Startup
waits for a health path and fails with the tail of the server's log, which is where the reason is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil  # a dependency of vLLM, so present wherever these servers run

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ours(port: int, *args: str) -> list[str]:
    """The command line of our server on loopback; `args` are its flags (`--model` included)."""
    return [sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(port), *args]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM's engine runs in children)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class ServerProcess:
    """`with ServerProcess(...) as server:` starts the command and waits until it is healthy.

    `command` is a function of the port (one is picked free), so the same object can also be
    restarted by a sweep. `env`, when given, replaces the environment entirely.
    """

    def __init__(
        self,
        name: str,
        command,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        health_path: str = "/health",
        startup_s: float = 900,
        stop_s: float = 60,
    ):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command: list[str] = command(self.port)
        self.log_path = log_path
        self.env = env
        self.health_path = health_path
        self.startup_limit_s = startup_s
        self.stop_s = stop_s
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip

        while time.monotonic() - started < self.startup_limit_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.health_path, timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            time.sleep(1)

        self.__exit__()
        raise RuntimeError(f"{self.name} server not healthy in {self.startup_limit_s:.0f} s")

    def __exit__(self, *_exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # to the server alone: it drains, then stops
        try:
            self.process.wait(timeout=self.stop_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def rss_bytes(self) -> int:
        return 0 if self.process is None else tree_rss(self.process.pid)
