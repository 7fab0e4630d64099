"""Fine-tune a LoRA adapter from a YAML config.

    python -m train configs/train/gemma3-270m-lora-cpu.yaml [--set training.max_steps=60] \
        [--dry-run] [--serve http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from train.config import ConfigError, load_config
from train.data import DataError

logger = logging.getLogger("train")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a YAML file, e.g. configs/train/gemma3-270m-lora-cpu.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. training.max_steps=60",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and dataset statistics, then exit",
    )
    parser.add_argument("--serve", metavar="URL", help="register the adapter with this server")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = args.overrides + ([f"serve.url={args.serve}"] if args.serve else [])
    try:
        config = load_config(args.config, overrides)
        return dry_run(config) if args.dry_run else run(config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def dry_run(config) -> int:
    from train.run import plan, prepare

    prepared = prepare(config)
    report = {
        "config": config.model_dump(mode="json"),
        "data": {
            "train": prepared.data.train.stats(),
            "eval": prepared.data.eval.stats() if prepared.data.eval else None,
        },
        "plan": plan(config, prepared.data),
    }
    print(json.dumps(report, indent=2))
    return 0


def run(config) -> int:
    from train.progress import LossBar
    from train.register import RegisterError, place_adapter, register
    from train.run import train

    result = train(config, callbacks=[LossBar()])
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {json.dumps(result.manifest['metrics'])}")
    if not config.serve.url:
        return 0
    path = place_adapter(result.adapter_dir, config.serve.adapters_dir, config.adapter_name)
    try:
        answer = register(
            config.serve.url,
            config.adapter_name,
            path,
            config.serve.api_key,
            config.serve.timeout_s,
        )
    except RegisterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"server answered HTTP {answer.status}: {answer.body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
