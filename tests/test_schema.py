"""Schemathesis against the server's own OpenAPI schema: whatever it generates, valid or not,
the answer is never a 5xx, and every 4xx is OpenAI's error shape.

The schema is read from the running server (/openapi.json). Generation lengths are held at a few
tokens so that each accepted request costs a fraction of a second on the CPU: the schema's
`max_tokens` is capped, and bodies that leave it out or ask for more are clamped before sending.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import MODEL

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 20
MAX_TOKENS = 4
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
# Larger asks are left alone: past the context length they must be refused with a 400.
CLAMP_BELOW = 1_000_000


def _bounded(openapi: dict) -> dict:
    """The server's schema with generation lengths capped, so generated requests stay cheap."""
    openapi = copy.deepcopy(openapi)
    for model in openapi["components"]["schemas"].values():
        properties = model.get("properties", {})
        if "max_tokens" not in properties:
            continue
        for field in LENGTH_FIELDS:
            if field in properties:
                properties[field] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        properties["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        # Any other name is a quick 404; the served one takes requests through to the engine.
        properties["model"] = {"type": "string", "enum": [MODEL]}
        model["required"] = sorted({*model.get("required", []), "max_tokens"})
    return openapi


@pytest.fixture(scope="module")
def api_schema(server, http):
    openapi = http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_bounded(openapi))
    schema.config.update(base_url=server.url, headers=server.headers())
    return schema


def _clamp(body):
    """Negative cases may drop `max_tokens` or ask for thousands; keep the generation short."""
    if not isinstance(body, dict):
        return body
    body.setdefault("max_tokens", MAX_TOKENS)
    for field in LENGTH_FIELDS:
        value = body.get(field)
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is not None and MAX_TOKENS < number < CLAMP_BELOW:
            body[field] = MAX_TOKENS
    return body


def _plain_conversation(body, every_other: bool):
    """Every other positive chat case gets one plain user turn in place of its messages.

    The schema admits conversations the chat policy refuses with a 400 (a tool turn, no user
    turn, an assistant turn last, an image URL that is not one), so left as generated, the 20
    cases may all stop at the policy; with one plain turn the generated sampling fields (n, stop,
    logprobs, penalties, ...) reach the engine, where a 500 would hide.
    """
    if every_other and isinstance(body, dict):
        body["messages"] = [{"role": "user", "content": "Say hello."}]
    return body


@schemathesis.check
def openai_shaped_errors(ctx, response, case):
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"], body
    return None


def _operations(schema) -> list:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    return operations


# schemathesis' own pytest entry point (`schemathesis.pytest.from_fixture`) fails on pytest 9
# (it sets `request.node._nodeid`, which pytest 9 no longer has), so the test drives
# schemathesis' strategies through Hypothesis itself, in both of its generation modes.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_openai_errors(api_schema, server, mode):
    statuses = collections.Counter()
    turns = itertools.cycle([False, True])
    for operation in _operations(api_schema):
        if mode is GenerationMode.NEGATIVE and not list(operation.body):
            continue  # nothing to get wrong in a request without a body

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,  # the same cases every run, so a failure can be reproduced
        )
        def call(case):
            if case.body is not None and not isinstance(case.body, (str, bytes)):
                case.body = _clamp(case.body)
            if mode is GenerationMode.POSITIVE and case.path == "/v1/chat/completions":
                case.body = _plain_conversation(case.body, every_other=next(turns))
            response = case.call(headers=server.headers(), timeout=300)
            statuses[(case.path, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error, openai_shaped_errors])

        call()

    logger.info("%s cases: %s", mode, dict(statuses))
    if mode is GenerationMode.POSITIVE:
        for path in ("/v1/chat/completions", "/v1/completions"):
            assert statuses[(path, 200)] > 0, statuses
    else:
        assert sum(n for (_, status), n in statuses.items() if 400 <= status < 500) > 0, statuses
