"""Prefill time, peak memory and KV cache held at long context, against the sliding-window bound.

    python benchmarks/long_context.py --model gemma-3-270m --lengths 2048,8192,16384,32768

Starts the server (`python -m serve`, vLLM engine) on a free loopback port with
--max-model-len 32768, then sends one greedy streamed completion per length (16 generated
tokens), shortest first. For each length it records:

- prefill seconds (time to the first streamed token, after one discarded warm-up request);
- peak resident memory of the server's processes (sampled every 20 ms during the request) and the
  growth over the idle server;
- the KV bytes local and global layers held at their peak (from /metrics, which reads vLLM's KV
  cache manager; peaks only grow, so shortest-first gives each length its own peak);
- the sliding-window bound: every global layer keeps all L tokens, every local layer
  min(L, window) tokens, and the ratio of what was held to it (target: at most 1.2x). The
  "chunk-aware" bound adds what one scheduled prefill chunk needs on top of the window;
- the KV bytes held while decoding (read from /metrics after the 8th streamed token, the prompt
  fully in the cache) against the same window bound: the steady state a long chat lives in. The
  peak above is a prefill transient: a chunk of `max_num_batched_tokens` tokens is written to
  every local layer before the tokens that fell out of the window can be freed.

Writes benchmarks/results/long_context-<model>-chunk-<N|default>.json with the command that made
it (the server's log goes to the temporary directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the shared server code is in benchmarks/

from benchmarks._servers import ServerProcess, ours  # noqa: E402 (needs the path above)

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
logger = logging.getLogger("long_context")


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the engine core, its workers).

    The same figure as `_servers.tree_rss`, kept apart because it is sampled every 20 ms while
    the prefill is timed: it reads only the tree's own /proc files, where psutil's `children()`
    reads every process's (a few ms a call, a noticeable share of a core on this machine)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
        stack.extend(int(child) for child in children)
    return total


class PeakSampler:
    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def kv_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.findall(r"^gemma_engine_(kv_\w+) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def prompt_of(tokenizer, tokens: int) -> list[int]:
    """BOS and filler text, opening with the length: vLLM caches prompt prefixes, so prompts that
    shared their start would have the shorter one's prefill timed as the longer one's."""
    text = f"Document of {tokens} tokens. " + FILLER * (tokens // 20 + 1)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *ids[: tokens - 2]]


DECODE_TOKENS = 16
KV_READ_AT_TOKEN = 8


def complete(url: str, prompt: list[int], on_token=None) -> tuple[float, dict]:
    """Stream a greedy completion; (seconds to the first token, usage). `on_token(k)` is called
    as the k-th token arrives, while the request is still decoding."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": DECODE_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first = None
    usage = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                first = first or time.perf_counter()
                tokens += 1
                if on_token is not None:
                    on_token(tokens)
    if usage is None:
        raise RuntimeError("the stream carried no usage chunk")
    return first - started, usage


def measure(url: str, pid: int, tokenizer, length: int, kv_token_bytes: int) -> dict:
    idle = tree_rss_bytes(pid)
    decoding: dict[str, float] = {}

    def read_kv(token: int) -> None:
        if token == KV_READ_AT_TOKEN:
            decoding.update(kv_metrics(url))

    with PeakSampler(pid) as sampler:
        seconds, usage = complete(url, prompt_of(tokenizer, length), read_kv)
    kv = kv_metrics(url)
    prompt_tokens = usage["prompt_tokens"]
    window, chunk = kv["kv_window"], kv["kv_max_batched_tokens"]
    local_layers, global_layers = kv["kv_local_layers"], kv["kv_global_layers"]

    def window_bound(tokens: int) -> float:
        return kv_token_bytes * (global_layers * tokens + local_layers * min(tokens, window))

    bound = window_bound(prompt_tokens)
    chunk_aware = kv_token_bytes * (
        global_layers * prompt_tokens
        + local_layers * min(prompt_tokens, window + min(chunk, prompt_tokens))
    )
    held = kv["kv_local_bytes_peak"] + kv["kv_global_bytes_peak"]
    held_decoding = decoding["kv_local_bytes"] + decoding["kv_global_bytes"]
    bound_decoding = window_bound(prompt_tokens + KV_READ_AT_TOKEN)
    row = {
        "tokens": prompt_tokens,
        "prefill_seconds": round(seconds, 3),
        "prefill_tokens_per_second": round(prompt_tokens / seconds, 1),
        "peak_rss_mib": round(sampler.peak / 2**20, 1),
        "rss_growth_mib": round((sampler.peak - idle) / 2**20, 1),
        "kv_local_bytes_peak": int(kv["kv_local_bytes_peak"]),
        "kv_global_bytes_peak": int(kv["kv_global_bytes_peak"]),
        "kv_held_bytes": int(held),
        "kv_full_attention_bytes": int(
            kv_token_bytes * (local_layers + global_layers) * prompt_tokens
        ),
        "kv_window_bound_bytes": int(bound),
        "kv_ratio_to_bound": round(held / bound, 3),
        "kv_chunk_aware_bound_bytes": int(chunk_aware),
        "kv_ratio_to_chunk_aware_bound": round(held / chunk_aware, 3),
        "kv_decoding_local_bytes": int(decoding["kv_local_bytes"]),
        "kv_decoding_global_bytes": int(decoding["kv_global_bytes"]),
        "kv_decoding_window_bound_bytes": int(bound_decoding),
        "kv_decoding_ratio_to_bound": round(held_decoding / bound_decoding, 3),
    }
    logger.info("%s", row)
    return row


def kv_bytes_per_token_per_layer(model_path: Path) -> int:
    """K and V of one token in one layer, bf16: 2 * kv_heads * head_dim * 2 bytes."""
    config = json.loads((model_path / "config.json").read_text())
    text = config.get("text_config", config)
    return 2 * text["num_key_value_heads"] * text["head_dim"] * 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--lengths", default="2048,8192,16384,32768")
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="the prefill chunk (default: vLLM's)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from transformers import AutoTokenizer

    from quant.resolve import resolve_model

    model_path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args.out.mkdir(parents=True, exist_ok=True)
    # 1 GiB holds 32K tokens of this model's KV many times over, and leaves memory to others.
    extra = ["--max-model-len", str(args.max_model_len), "--cpu-kv-cache-gib", "1"]
    if args.max_num_batched_tokens:
        extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    chunk = args.max_num_batched_tokens or "default"
    log_path = Path(tempfile.gettempdir()) / f"long_context-{args.model}-chunk-{chunk}.log"
    logger.info("server log: %s", log_path)
    flags = ["--model", args.model, "--engine", "vllm", *extra]
    # 120 s to stop: the server drains for up to 30 s (drain_seconds), then shuts vLLM down.
    server = ServerProcess(
        "long_context", lambda port: ours(port, *flags), log_path, startup_s=900, stop_s=120
    )
    with server:
        url = server.url
        complete(url, prompt_of(tokenizer, 256))  # warm-up, discarded
        lengths = sorted(int(n) for n in args.lengths.split(","))
        token_bytes = kv_bytes_per_token_per_layer(model_path)
        # Prompt and generated tokens together fill the length exactly.
        pid = server.process.pid
        rows = [measure(url, pid, tokenizer, n - DECODE_TOKENS, token_bytes) for n in lengths]
        kv = kv_metrics(url)

    result = {
        "command": "python benchmarks/long_context.py " + shlex.join(argv or sys.argv[1:]),
        "model": args.model,
        "engine": "vllm",
        "machine": f"{os.cpu_count()} CPUs",
        "server_args": extra,
        "window": kv.get("kv_window"),
        "block_size": kv.get("kv_block_size"),
        "max_batched_tokens": kv.get("kv_max_batched_tokens"),
        "local_layers": kv.get("kv_local_layers"),
        "global_layers": kv.get("kv_global_layers"),
        "kv_bytes_per_token_per_layer": token_bytes,
        "rows": rows,
    }
    out = args.out / f"long_context-{args.model}-chunk-{chunk}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
