"""Plain ASGI middleware (no per-request task, so streaming and disconnects behave): the API key,
the body-size cap, and request counting."""

from __future__ import annotations

import hmac
import json
import logging

from serve.errors import APIError, error_body

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}


class GuardMiddleware:
    def __init__(
        self, app, api_key: str | None, max_body_bytes: int, metrics, metrics_public: bool = True
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        path = scope["path"]
        status_seen = {}
        if scope["method"] == "POST" and not _has_header(scope, b"content-type"):
            # `curl -d '{...}'` sends no JSON content type; the body is still JSON, so read it so.
            scope = {
                **scope,
                "headers": [*scope["headers"], (b"content-type", b"application/json")],
            }

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in self.open_paths and not self._authorised(scope):
                return await _reply(
                    counting_send,
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers=[(b"www-authenticate", b"Bearer")],
                )

            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                return await _reply(counting_send, 413, self._too_large(declared), param="body")
            await self.app(scope, self._capped(receive, counting_send), counting_send)
        finally:
            route = path if path.startswith(("/v1/", "/health", "/metrics")) else "other"
            self.metrics.requests.labels(route, str(status_seen.get("status", 0))).inc()

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.api_key
                )
        return False

    def _too_large(self, size: int) -> str:
        return (
            f"the request body is {size} bytes, over this server's limit of "
            f"{self.max_body_bytes}; send less (or raise max_body_mb)"
        )

    def _capped(self, receive, send):
        """A body sent without Content-Length is counted as it arrives."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # Raised inside the app's body read, so the app's error handler answers it.
                    raise APIError(413, self._too_large(seen), param="body")
            return message

        return wrapped


def _has_header(scope, name: bytes) -> bool:
    return any(key == name for key, _ in scope.get("headers", []))


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reply(send, status: int, message: str, param=None, code=None, headers=()):
    body = json.dumps(error_body(status, message, param, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
