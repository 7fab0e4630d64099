"""One place that turns any exception into OpenAI's error body and the right status.

Body: {"error": {"message", "type", "param", "code"}}. A user's mistake is a 4xx that names the
field and says the fix; only the server's own failures are 5xx.
"""

from __future__ import annotations

import json
import logging
import sys

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


# Starlette's own words for a request no route takes, and what to tell the client instead.
_ROUTING = {
    (404, "Not Found"): "this server has no such route; GET /openapi.json lists its routes",
    (405, "Method Not Allowed"): (
        "this route does not take that method; GET /openapi.json lists each route's methods"
    ),
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
    if isinstance(error, ValueError) and "embedded null byte" in str(error):
        # A NUL character in a path (lora_path, a media file) reaches the OS layer as this.
        return APIError(
            400,
            "a path in the body holds a NUL character (\\u0000); send a plain path",
            param="body",
            code="invalid_request",
        )
    if isinstance(error, UnicodeEncodeError) and "surrogates not allowed" in str(error):
        # pydantic refuses a dict key holding a lone surrogate before any validator of ours runs.
        return APIError(
            400,
            "the body holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its "
            "pair), which is not valid Unicode text; send valid text",
            param="body",
            code="invalid_request",
        )
    if isinstance(error, StarletteHTTPException):
        unreadable = _unreadable_body(error)
        if unreadable is not None:
            return unreadable
        message = _ROUTING.get((error.status_code, error.detail), str(error.detail))
        return APIError(error.status_code, message, headers=dict(error.headers or {}))
    if _is_engine_client_error(error):
        return APIError(400, str(error), param=getattr(error, "parameter", None))
    logger.exception("internal error while handling a request", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__})", code="internal_error")


def _unreadable_body(error: StarletteHTTPException) -> APIError | None:
    """FastAPI answers any failure while reading the body with a bare 400 and chains the cause;
    the cause says what the client got wrong (or is our own body-size cap, raised mid-read)."""
    cause = error.__cause__
    if cause is None or error.status_code != 400:
        return None
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, UnicodeDecodeError):
        message = (
            f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start}); "
            "send JSON encoded as UTF-8"
        )
    elif isinstance(cause, RecursionError):
        message = "the body nests JSON too deeply to parse; send a flatter JSON object"
    else:
        message = f"the body cannot be parsed ({type(cause).__name__}); send a JSON object"
    return APIError(400, message, param="body", code="invalid_request")


def _is_engine_client_error(error: BaseException) -> bool:
    """vLLM marks errors caused by the request (a token id out of vocabulary, say) as
    VLLMClientError. Looked up only if vLLM is already imported, so no engine is required."""
    exceptions = sys.modules.get("vllm.exceptions")
    client_error = getattr(exceptions, "VLLMClientError", None)
    return client_error is not None and isinstance(error, client_error)


def _validation_error(error: RequestValidationError) -> APIError:
    found: list[tuple[str, str]] = []  # (param, problem)
    for item in error.errors():
        if item.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({item.get('msg')}); send a JSON object"
            return APIError(400, message, param="body", code="invalid_request")
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        # Union members add their type name to the location; it only confuses the field path.
        location = [part for part in location if not _is_type_tag(part)]
        param = ".".join(location) or "body"
        value = item.get("input")
        shown = repr(value)[:80] if value is not None and item.get("type") != "missing" else None
        problem = f"{param}: {item.get('msg')}" + (f" (got {shown})" if shown else "")
        if item.get("type") == "missing":
            problem += _wrong_endpoint_hint(param, error.body)
        found.append((param, problem))
    # A value that fits no member of a union fails once per member: `content` is not a string,
    # and `content.1.input_audio.format` is not 'wav'. The deeper failure is the one that helps.
    deepest = [
        (param, problem)
        for param, problem in found
        if not any(other.startswith(param + ".") for other, _ in found)
    ] or found
    problems = list(dict.fromkeys(problem for _, problem in deepest))
    return APIError(400, "; ".join(problems), param=deepest[0][0], code="invalid_request")


# A required field missing while the body carries the other endpoint's field instead: the request
# was sent to the wrong route. (missing field, field sent) -> what this route takes and the fix.
_WRONG_ENDPOINT = {
    ("messages", "prompt"): (
        'this endpoint takes a list of chat messages ({"role": "user", "content": ...}); '
        "send `prompt` to /v1/completions instead"
    ),
    ("prompt", "messages"): (
        "this endpoint takes a `prompt` (a string, a list of strings or token ids); "
        "send `messages` to /v1/chat/completions instead"
    ),
}


def _wrong_endpoint_hint(missing: str, body) -> str:
    if not isinstance(body, dict):
        return ""
    for (wanted, sent), hint in _WRONG_ENDPOINT.items():
        if missing == wanted and sent in body:
            return f"; {hint}"
    return ""


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "list", "dict", "none"}


def _is_type_tag(part: str) -> bool:
    """pydantic's name for a union member ('str', 'constrained-str', 'list[int]', 'TextPart')."""
    return (
        part[:1].isupper()
        or "[" in part
        or part in _TYPE_TAGS
        or part.startswith(("constrained-", "function-"))
    )


class _AsciiJSONResponse(JSONResponse):
    """JSON escaped to ASCII: an error may quote a client's text, and text holding a lone UTF-16
    surrogate cannot be encoded as UTF-8, so the error about it would itself fail."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_error(error: APIError) -> JSONResponse:
    return _AsciiJSONResponse(
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
        # Named apart from Exception: Starlette answers a handler for Exception and then re-raises,
        # which drops the client's connection; a surrogate or NUL in a body surfaces as these.
        ValueError,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
