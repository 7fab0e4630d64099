"""One place that turns any exception into OpenAI's error body and the right status.

Body: {"error": {"message", "type", "param", "code"}}. A user's mistake is a 4xx that names the
field and says the fix; only the server's own failures are 5xx.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quant.chat import ChatError
from serve.engine.base import AdapterError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def to_api_error(error: BaseException) -> APIError:
    """Classify an exception raised while handling a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ChatError):
        return APIError(400, str(error), param=error.param)
    if isinstance(error, AdapterError):
        return APIError(error.status, str(error), param=error.param)
    if isinstance(error, RequestValidationError):
        return _validation_error(error)
    if isinstance(error, StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), headers=dict(error.headers or {}))
    logger.exception("internal error while handling a request", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__})", code="internal_error")


def _validation_error(error: RequestValidationError) -> APIError:
    problems = []
    first_param = None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        # Union members add their type name to the location; it only confuses the field path.
        location = [part for part in location if not part[:1].isupper() and "[" not in part]
        param = ".".join(location) or "body"
        first_param = first_param or param
        if item.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({item.get('msg')}); send a JSON object")
            first_param = "body"
            continue
        value = item.get("input")
        shown = repr(value)[:80] if value is not None and item.get("type") != "missing" else None
        problems.append(f"{param}: {item.get('msg')}" + (f" (got {shown})" if shown else ""))
    return APIError(400, "; ".join(problems), param=first_param, code="invalid_request")


def json_error(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def install_handlers(app: FastAPI) -> None:
    async def handle(_request: Request, error: Exception) -> JSONResponse:
        return json_error(to_api_error(error))

    for kind in (
        APIError,
        ChatError,
        AdapterError,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
