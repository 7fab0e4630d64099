"""Assemble and run the server: model -> chat policy -> engine -> app -> uvicorn."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

import uvicorn

from quant.resolve import ModelNotFoundError, resolve_model
from serve.config import ServeConfig
from serve.engine import ParallelismError
from serve.security import UnsafeWeightsError, check_weights_format

logger = logging.getLogger(__name__)


def load_policy(model_path: Path):
    from transformers import AutoTokenizer

    from quant.chat import ChatPolicy

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return ChatPolicy(tokenizer, model_path / "generation_config.json")


def build(config: ServeConfig):
    """The ASGI app for `config`, its engine not yet started."""
    from serve.app import build_app
    from serve.engine import build_engine

    resolved = resolve_model(config.model)
    check_weights_format(resolved.path, config.allow_pickle)
    policy = load_policy(resolved.path)
    engine = build_engine(config, resolved.path, policy)
    adapters = None
    if config.adapters_dir is not None:
        from serve.adapters import AdapterRegistry

        adapters = AdapterRegistry(config, engine, resolved.path)
    media = None
    if len(engine.modalities) > 1:
        from serve.media import MediaLoader

        media = MediaLoader(config)
    return build_app(config, engine, adapters=adapters, media=media)


def _drained(signum, _frame) -> None:
    """uvicorn catches SIGTERM, drains, shuts the engine down, then raises the signal again so
    the default action would kill the process. By then the shutdown was clean: exit 0 instead."""
    logger.info("shut down after %s", signal.Signals(signum).name)


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, found before minutes of engine start-up."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        return (
            f"cannot listen on {host}:{port} ({error.strerror}); stop what holds the port "
            "or pass --port with another number"
        )
    return None


def run(config: ServeConfig) -> int:
    problem = port_problem(config.host, config.port)
    if problem:
        logger.error("%s", problem)
        return 2
    try:
        app = build(config)
    except (ModelNotFoundError, UnsafeWeightsError, ParallelismError) as error:
        logger.error("%s", error)
        return 2
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        # 0 means no wait at all (uvicorn reads None as "wait for ever").
        timeout_graceful_shutdown=config.drain_seconds,
        access_log=config.log_level == "debug",
    )
    return 0
