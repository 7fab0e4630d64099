"""python -m quant fetch gemma-3-270m | convert FILE.gguf [--out DIR] | bench ...

`fetch` resolves a model name as the server does (converting it on first use) and prints its path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant")
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch", help="obtain and convert a model, print its directory")
    fetch.add_argument("model")

    convert = commands.add_parser("convert", help="convert a GGUF file to a bf16 checkpoint")
    convert.add_argument("gguf", type=Path)
    convert.add_argument("--out", type=Path, required=True)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "fetch":
        from quant.resolve import resolve_model

        print(resolve_model(args.model).path)
    elif args.command == "convert":
        from quant.convert import convert_gguf

        print(convert_gguf(args.gguf, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
