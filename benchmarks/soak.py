"""Soak: many concurrent streaming clients against the real server for minutes, then the figures.

    python benchmarks/soak.py --clients 64 --duration 300 --max-tokens 32

It starts `python -m serve` itself on a free loopback port (pass extra server flags after `--`),
or drives one already running with `--url URL --pid PID`. Each client streams chat completions
back to back until the duration is up; then the clients finish their current request and stop.
Measured: requests, errors (non-200, an in-band error event, a stream without [DONE], a client
exception), latency and time to first token (p50/p95/p99), tokens/s, and the peak RSS of the
server's process tree (the server and vLLM's engine processes), sampled every second. After the
load the engine must be idle again (gemma_engine_unfinished_requests == 0 on /metrics).

The result is written to benchmarks/results/soak-<time>.json with the command that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

logger = logging.getLogger("soak")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the shared server code is in benchmarks/

from benchmarks._servers import ServerProcess, ours, tree_rss  # noqa: E402 (needs the path above)

RESULTS = REPO / "benchmarks" / "results"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List five fruits and their colours.",
    "Tell me a story about a robot.",
    "Count from one to twenty in words.",
    "Describe how rain forms.",
]


@dataclass
class Sample:
    ok: bool
    seconds: float
    ttft: float | None
    tokens: int
    error: str | None = None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    rss_peak: int = 0
    rss_first: int = 0
    rss_last: int = 0
    rss_trace: list[tuple[float, int]] = field(default_factory=list)


# -- the server -----------------------------------------------------------------------------------


def start_server(stack: contextlib.ExitStack, args, log_path: Path) -> ServerProcess:
    """Our server, stopped when `stack` closes; its exit code is then `returncode`."""
    flags = ["--model", args.model, "--api-key", args.api_key, *args.server_args]
    # 120 s to stop: the server drains for up to 30 s (drain_seconds), then shuts vLLM down.
    server = ServerProcess("soak", lambda port: ours(port, *flags), log_path, stop_s=120)
    logger.info("starting: %s (log: %s)", shlex.join(server.command), log_path)
    try:
        return stack.enter_context(server)
    except RuntimeError as error:  # a clean exit with the log's tail, not a traceback
        raise SystemExit(str(error)) from None


# -- the clients ----------------------------------------------------------------------------------


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens, done, error = None, 0, False, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Sample(False, time.perf_counter() - started, None, 0, f"HTTP {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    error = f"in-band: {event['error'].get('message', '')[:200]}"
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif ttft is None and any(c["delta"].get("content") for c in event["choices"]):
                    ttft = time.perf_counter() - started
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and not done:
        error = "the stream ended without [DONE]"
    return Sample(error is None, time.perf_counter() - started, ttft, tokens, error)


async def client_loop(
    index: int, client: httpx.AsyncClient, model: str, max_tokens: int, stop_at: float, run: Run
) -> None:
    turn = 0
    while time.monotonic() < stop_at:
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        run.samples.append(await one_stream(client, model, prompt, max_tokens))
        turn += 1


async def sample_memory(pid: int, run: Run, stop: asyncio.Event, started: float) -> None:
    while not stop.is_set():
        rss = tree_rss(pid)
        run.rss_peak = max(run.rss_peak, rss)
        run.rss_first = run.rss_first or rss
        run.rss_last = rss
        run.rss_trace.append((round(time.monotonic() - started, 1), rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def soak(url: str, pid: int, args, api_key: str) -> Run:
    run = Run()
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout)
    started = time.monotonic()
    stop_at = started + args.duration
    stop = asyncio.Event()
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as c:
        memory = asyncio.create_task(sample_memory(pid, run, stop, started))
        clients = [
            client_loop(i, c, args.served_model, args.max_tokens, stop_at, run)
            for i in range(args.clients)
        ]
        await asyncio.gather(*clients)
        stop.set()
        await memory
    return run


# -- the figures ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarise(run: Run, wall: float) -> dict:
    ok = [s for s in run.samples if s.ok]
    latencies = [s.seconds for s in ok]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    tokens = sum(s.tokens for s in ok)
    errors: dict[str, int] = {}
    for sample in run.samples:
        if not sample.ok:
            errors[sample.error] = errors.get(sample.error, 0) + 1
    return {
        "requests": len(run.samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_seconds": round(wall, 1),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 1) if wall else None,
        "requests_per_second": round(len(ok) / wall, 2) if wall else None,
        "latency_seconds": {f"p{q}": _round(percentile(latencies, q)) for q in (50, 95, 99)},
        "ttft_seconds": {f"p{q}": _round(percentile(ttfts, q)) for q in (50, 95, 99)},
        "rss_mib": {
            "first": _mib(run.rss_first),
            "peak": _mib(run.rss_peak),
            "last": _mib(run.rss_last),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def engine_idle(url: str, api_key: str, seconds: float = 120) -> bool:
    """True once /metrics shows no request left in the engine."""
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {api_key}"}
    while time.monotonic() < deadline:
        for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
            if line.startswith("gemma_engine_unfinished_requests ") and float(line.split()[1]) == 0:
                return True
        time.sleep(1)
    return False


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--model", default="gemma-3-270m", help="what the server serves")
    parser.add_argument("--served-model", default=None, help="`model` in requests")
    parser.add_argument("--url", help="a running server (loopback) instead of starting one")
    parser.add_argument("--pid", type=int, help="its process id, for memory (with --url)")
    parser.add_argument("--api-key", default="soak-key")
    parser.add_argument("--out", type=Path, help="result file (default: results/soak-TIME.json)")
    parser.add_argument("server_args", nargs="*", help="extra flags for the server, after --")
    args = parser.parse_args(argv)
    args.served_model = args.served_model or args.model
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server's process id, for its memory)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"soak-{stamp}.json"

    server = None
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, args.pid
        else:
            server = start_server(stack, args, out.with_suffix(".server.log"))
            url, pid = server.url, server.process.pid

        logger.info("%d clients for %.0f s against %s", args.clients, args.duration, url)
        started = time.monotonic()
        run = asyncio.run(soak(url, pid, args, args.api_key))
        wall = time.monotonic() - started
        idle = engine_idle(url, args.api_key)
    exit_code = server.returncode if server is not None else None  # after SIGTERM and drain

    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30),
        },
        "settings": {
            "clients": args.clients,
            "duration_seconds": args.duration,
            "max_tokens": args.max_tokens,
            "model": args.model,
            "server_args": args.server_args,
        },
        **summarise(run, wall),
        "engine_idle_after": idle,
        "server_exit_code": exit_code,
        "rss_trace_mib": [
            (t, _mib(rss)) for t, rss in run.rss_trace[:: max(1, len(run.rss_trace) // 60)]
        ],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_trace_mib"}, indent=2))
    return 0 if result["errors"] == 0 and idle else 1


if __name__ == "__main__":
    sys.exit(main())
