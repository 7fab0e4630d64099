"""Training throughput and peak memory: our pipeline against a plain TRL SFTTrainer script.

Both train the same LoRA (r 8, all linear layers) on the same chats with the same model, batch
size, length limit and step count, each in its own process so peak RSS is its own. Tokens/s
counts real (non-padding) tokens of the timed steps; the first warm-up steps are discarded.

Gradient checkpointing is compared matched: on in both (the default of both: TRL's SFTConfig and
our training.gradient_checkpointing) and off in both. Runs alternate between the pipelines so a
load that comes and goes hits both.

    python benchmarks/train_throughput.py [--steps 15] [--warmup 3] [--repeats 2]

Writes benchmarks/results/train_throughput-<date>.json with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma-3-270m"
WORDS = """river stone light window garden paper music winter market engine silver forest letter
bridge cloud station orange pocket thunder mirror planet candle harbor ladder violin quiet rapid
gentle narrow ancient golden hollow bright steady curious""".split()  # noqa: SIM905


def make_chats(path: Path, count: int, seed: int = 0) -> None:
    """Chats of varied length (prompts 20-120 words, answers 10-60): padding and prompt share
    are typical of instruction data, not of one fixed length."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            user = " ".join(rng.choices(WORDS, k=rng.randint(20, 120))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 60))) + "."
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")


class StepClock:
    """A Trainer callback: wall time and real tokens consumed at the end of every step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.marks.append((time.perf_counter(), train_dataloader.collate_fn.tokens))

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def rate(self, warmup: int) -> tuple[float, int]:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return (n1 - n0) / (t1 - t0), n1 - n0


class CountingCollator:
    """Wraps TRL's collator to count the real tokens it hands out."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def settings(args) -> dict:
    return {
        "gradient_checkpointing": bool(args.gc),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_steps": args.steps,
        "learning_rate": 2e-4,
        "r": 8,
        "alpha": 16,
    }


def run_ours(args, data: Path, out: Path) -> StepClock:
    from train.config import validate
    from train.run import train

    s = settings(args)
    config = validate(
        {
            "model": {"name": MODEL},
            "data": {"train": str(data)},
            "lora": {"r": s["r"], "alpha": s["alpha"], "dropout": 0.0},
            "training": {
                "max_steps": s["max_steps"],
                "learning_rate": s["learning_rate"],
                "batch_size": s["batch_size"],
                "max_length": s["max_length"],
                "lr_scheduler": "linear",
                "gradient_checkpointing": s["gradient_checkpointing"],
                "save_steps": 10_000,
                "log_steps": 10_000,
            },
            "output_dir": str(out),
        }
    )
    clock = StepClock()
    train(config, callbacks=[clock])
    return clock


def run_trl(args, data: Path, out: Path) -> StepClock:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from quant import resolve_model

    s = settings(args)
    path = resolve_model(MODEL).path
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in rows])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
        processing_class=AutoTokenizer.from_pretrained(path),
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=s["r"],
            lora_alpha=s["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        args=SFTConfig(
            output_dir=str(out),
            max_steps=s["max_steps"],
            learning_rate=s["learning_rate"],
            per_device_train_batch_size=s["batch_size"],
            max_length=s["max_length"],
            lr_scheduler_type="linear",
            gradient_checkpointing=s["gradient_checkpointing"],
            save_strategy="no",
            report_to="none",
            logging_steps=10_000,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),  # TRL's default bf16=True refuses the CPU else
        ),
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    return clock


def worker(args) -> None:
    runner = run_ours if args.worker == "ours" else run_trl
    with tempfile.TemporaryDirectory() as out:
        clock = runner(args, Path(args.data), Path(out))
    rate, tokens = clock.rate(args.warmup)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(
        json.dumps(
            {
                "tokens_per_s": round(rate, 1),
                "timed_tokens": tokens,
                "timed_steps": args.steps - args.warmup,
                "peak_rss_mib": round(peak_mib),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        make_chats(data, count=args.steps * args.batch_size)
        runs = {f"{name}-gc{gc}": [] for gc in (1, 0) for name in ("ours", "trl")}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all
            for key in runs:
                name, gc = key.split("-gc")
                runs[key].append(_spawn(name, int(gc), data, args))
                print(key, runs[key][-1], flush=True)

    best = {key: max(results, key=lambda r: r["tokens_per_s"]) for key, results in runs.items()}
    pairs = {
        "gradient_checkpointing_on_both_the_defaults": ("ours-gc1", "trl-gc1"),
        "gradient_checkpointing_off_both": ("ours-gc0", "trl-gc0"),
    }
    report = {
        "benchmark": "train_throughput",
        "command": "python " + " ".join(sys.argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": MODEL,
        "settings": settings(args) | {"warmup_steps": args.warmup, "repeats": args.repeats},
        "machine": _machine(),
        "runs": runs,
        "best": best,
        "ratios_ours_over_trl": {
            label: {
                "speed": _ratio(best[ours], best[trl], "tokens_per_s"),
                "peak_memory": _ratio(best[ours], best[trl], "peak_rss_mib"),
            }
            for label, (ours, trl) in pairs.items()
        },
        "targets": {"speed_at_least": 1.0, "peak_memory_at_most": 1.0},
        "load_average_at_end": os.getloadavg(),
    }
    report["settings"].pop("gradient_checkpointing")
    target = ROOT / "benchmarks/results" / f"train_throughput-{datetime.now(UTC):%Y%m%d}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("best", "ratios_ours_over_trl")}, indent=2))
    print(f"written to {target}")


def _ratio(ours: dict, trl: dict, key: str) -> float:
    return round(ours[key] / trl[key], 3)


def _spawn(name: str, gc: int, data: Path, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--gc",
        str(gc),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import platform

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "load_average_at_start": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
