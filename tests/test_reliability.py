"""Load, disconnects, overload and shutdown, on the real model.

Short versions of what `benchmarks/soak.py` runs for minutes: 64 concurrent streams once; a client
that leaves mid-stream; a server with `--max-pending 4` under a burst (503 + Retry-After, never a
hang); and SIGTERM while a stream is in flight (it finishes, then the process exits 0).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import API_KEY, MODEL, start_server, stop_server

STREAMS = 64
STREAM_TOKENS = 16
BURST = 12
LIMIT = 4


def gauge(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_for_gauge(http: httpx.Client, name: str, value: float, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    current = gauge(http, name)
    while current != value and time.monotonic() < deadline:
        time.sleep(0.5)
        current = gauge(http, name)
    return current


async def stream_chat(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict:
    """One streamed chat: its status, the text, the finish reason and whether [DONE] came."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Count from {index} upwards."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    result = {"status": None, "text": "", "finish": None, "done": False, "errors": []}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result["status"] = response.status_code
        result["headers"] = dict(response.headers)
        if response.status_code != 200:
            result["body"] = json.loads(await response.aread())
            return result
        async for line in response.aiter_lines():
            _take_event(line, result)
    return result


def _take_event(line: str, result: dict) -> None:
    if not line.startswith("data: "):
        return
    data = line[len("data: ") :]
    if data == "[DONE]":
        result["done"] = True
        return
    event = json.loads(data)
    if "error" in event:
        result["errors"].append(event["error"])
        return
    for choice in event["choices"]:
        result["text"] += choice["delta"].get("content", "")
        result["finish"] = choice["finish_reason"] or result["finish"]


async def concurrent_streams(url: str, count: int, max_tokens: int) -> list:
    limits = httpx.Limits(max_connections=count)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=600
    ) as client:
        tasks = [stream_chat(client, index, max_tokens) for index in range(count)]
        return await asyncio.gather(*tasks, return_exceptions=True)


# -- the shared server --------------------------------------------------------------------------


def test_64_concurrent_streams_all_complete(server, http):
    results = asyncio.run(concurrent_streams(server.url, STREAMS, STREAM_TOKENS))

    failures = [r for r in results if isinstance(r, BaseException) or r["status"] != 200]
    assert not failures, failures[:3]
    for result in results:
        assert result["done"] and not result["errors"], result
        assert result["finish"] in ("length", "stop") and result["text"], result
    assert wait_for_gauge(http, "gemma_engine_unfinished_requests", 0, 60) == 0
    assert gauge(http, "gemma_requests_in_flight") == 0


def test_client_disconnect_aborts_the_generation(server, http):
    """A stream of thousands of tokens, dropped after a few: the engine must let it go."""
    assert wait_for_gauge(http, "gemma_engine_unfinished_requests", 0, 60) == 0
    body = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6,",
        "max_tokens": 8000,
        "temperature": 0,
        "stream": True,
    }
    client = httpx.Client(base_url=server.url, headers=server.headers(), timeout=300)
    with client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        # The line iterator is held, not dropped by a `break`: a dropped iterator is closed when
        # it is collected, which closes the connection before the gauges below are read.
        lines = response.iter_lines()
        received = 0
        while received < 3:
            received += next(lines).startswith("data: ")
        assert gauge(http, "gemma_engine_unfinished_requests") >= 1
        assert gauge(http, "gemma_requests_in_flight") >= 1
        del lines
    # 8000 tokens take minutes here; only an abort empties the engine within the minute.
    assert wait_for_gauge(http, "gemma_engine_unfinished_requests", 0, 60) == 0
    assert gauge(http, "gemma_requests_in_flight") == 0
    assert "client went away" in server.log()


# -- a small server: overload and shutdown --------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """`--max-pending 4`, a drain long enough for one stream, /metrics behind the key."""
    log_path = tmp_path_factory.mktemp("limited") / "server.log"
    args = [
        "--model", MODEL,
        "--api-key", API_KEY,
        "--max-model-len", "2048",
        "--cpu-kv-cache-gib", "1",
        "--max-pending", str(LIMIT),
        "--drain-seconds", "120",
        "--no-metrics-public",
    ]  # fmt: skip
    running = start_server(args, log_path)
    yield running
    stop_server(running.process)


def test_past_max_pending_is_503_with_retry_after(limited):
    results = asyncio.run(concurrent_streams(limited.url, BURST, 64))

    assert not [r for r in results if isinstance(r, BaseException)], results
    served = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    assert len(served) + len(refused) == BURST, [r["status"] for r in results]
    assert LIMIT <= len(served) < BURST and refused, [r["status"] for r in results]
    for result in served:
        assert result["done"] and not result["errors"] and result["finish"] == "length", result
    for result in refused:
        assert int(result["headers"]["retry-after"]) >= 1
        error = result["body"]["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "server_overloaded"
        assert "max_pending" in error["message"]


def test_retry_after_a_503_is_served(limited):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=limited.url, headers=headers, timeout=300) as client:
        response = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}
        )
        assert response.status_code == 200
        assert gauge(client, "gemma_requests_in_flight") == 0
        assert wait_for_gauge(client, "gemma_engine_unfinished_requests", 0, 60) == 0
    assert httpx.get(limited.url + "/metrics").status_code == 401  # --no-metrics-public


def test_sigterm_drains_a_stream_in_flight_then_exits_0(limited):
    process = psutil.Process(limited.process.pid)
    children = process.children(recursive=True)
    body = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 96, "temperature": 0}
    started = threading.Event()
    result = {"status": None, "text": "", "finish": None, "done": False, "errors": []}

    def consume():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        client = httpx.Client(base_url=limited.url, headers=headers, timeout=300)
        with client, client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                started.set()
                _take_completion_event(line, result)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(300), "the stream never started"
    limited.process.terminate()
    reader.join(300)

    assert not reader.is_alive()
    assert result["status"] == 200 and result["done"] and not result["errors"], result
    assert result["finish"] == "length", result
    assert limited.process.wait(180) == 0, limited.log()[-3000:]
    time.sleep(2)
    assert not [child for child in children if child.is_running()], "engine processes outlived"


def _take_completion_event(line: str, result: dict) -> None:
    if not line.startswith("data: "):
        return
    data = line[len("data: ") :]
    if data == "[DONE]":
        result["done"] = True
        return
    event = json.loads(data)
    if "error" in event:
        result["errors"].append(event["error"])
        return
    for choice in event["choices"]:
        result["text"] += choice["text"]
        result["finish"] = choice["finish_reason"] or result["finish"]
