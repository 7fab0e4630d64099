"""The FastAPI application: routes, lifecycle, and the pieces wired together.

`build_app(config, engine)` is all a caller needs; the engine is started in the app's lifespan so
that uvicorn owns the event loop vLLM's client runs in.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve.config import ServeConfig
from serve.engine.base import Engine
from serve.errors import APIError, install_handlers
from serve.metrics import Metrics
from serve.middleware import GuardMiddleware
from serve.openai_api import OpenAIService
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)

logger = logging.getLogger(__name__)


def build_app(config: ServeConfig, engine: Engine, adapters=None, media=None) -> FastAPI:
    metrics = Metrics(engine_stats=engine.stats)
    service = OpenAIService(engine, metrics, config.max_pending, media=media, adapters=adapters)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await engine.start()
        if adapters is not None:
            await adapters.start()
        logger.info("serving %r with the %s engine", engine.model_name, engine.name)
        try:
            yield
        finally:
            if adapters is not None:
                await adapters.stop()
            await engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="gemma-stack", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.engine = engine
    app.state.adapters = adapters
    install_handlers(app)

    @app.get("/health")
    async def health():
        if not engine.healthy():
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        return {
            "status": "ok",
            "model": engine.model_name,
            "engine": engine.name,
            "quantization": engine.quantization(),
        }

    @app.get("/metrics")
    async def prometheus():
        service.metrics.in_flight.set(service.in_flight)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return service.list_models()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.completions(body, request)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        registry = _registry(adapters)
        result = await registry.load(body.lora_name, body.lora_path)
        return JSONResponse(result)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        registry = _registry(adapters)
        await registry.unload(body.lora_name)
        return {"status": "unloaded", "lora_name": body.lora_name}

    app.add_middleware(
        GuardMiddleware,
        api_key=config.api_key,
        max_body_bytes=int(config.max_body_mb * 1024 * 1024),
        metrics=metrics,
        metrics_public=config.metrics_public,
    )
    return app


def _registry(adapters):
    if adapters is None:
        raise APIError(
            400,
            "this server was started without an adapters directory; restart it "
            "with --adapters-dir DIR to load LoRA adapters",
            param="lora_path",
            code="adapters_disabled",
        )
    return adapters
