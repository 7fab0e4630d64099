"""python -m quant fetch gemma-3-270m | convert FILE.gguf --out DIR | bench --model M --levels ...
| export --model M [--group-size 32] [--no-head] [--method gptq|rtn] [--out DIR]

`fetch` resolves a model name as the server does (converting it on first use) and prints its path.
`export` writes the 4-bit checkpoint vLLM serves at `--bits 4` (quant/export_vllm.py), cached in
the models directory, and prints its path.
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
    fetch.add_argument(
        "--gguf", action="store_true", help="print the GGUF file it is made from (known names)"
    )

    convert = commands.add_parser("convert", help="convert a GGUF file to a bf16 checkpoint")
    convert.add_argument("gguf", type=Path)
    convert.add_argument("--out", type=Path, required=True)

    bench = commands.add_parser("bench", help="perplexity, KL, size and speed per level")
    bench.add_argument("--model", default="gemma-3-270m")
    bench.add_argument(
        "--levels", default="bf16,8,4,4-tied,3",
        help="comma-separated: bf16, 8, 4, 3, each optionally :METHOD (4:bnb, 3:hqq; default: "
        "quant.load's) and -tied (bf16 head shared with the embedding) or +head (int8 head and "
        "embedding table), gguf (the Q4_K_M file dequantised), llama.cpp (that file scored by "
        "llama.cpp; see --llamacpp-python) and llama.cpp:Q4_0 or llama.cpp:Q4_1 (llama.cpp's "
        "plain 4-bit formats made from the same weights)",
    )  # fmt: skip
    bench.add_argument("--window", type=int, default=256)
    bench.add_argument("--stride", type=int, default=192)
    bench.add_argument("--windows", type=int, default=4)
    bench.add_argument("--decode-tokens", type=int, default=16)
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    bench.add_argument(
        "--llamacpp-python", type=Path, default=None,
        help="the interpreter with llama-cpp-python for the llama.cpp level (default: the repo's "
        ".venv-llamacpp, made by benchmarks/install_llamacpp.sh)",
    )  # fmt: skip

    export = commands.add_parser("export", help="write the 4-bit checkpoint vLLM serves")
    export.add_argument("--model", default="gemma-3-270m")
    export.add_argument("--group-size", type=int, default=32, help="inputs per scale and zero")
    export.add_argument(
        "--no-head", action="store_true", help="keep the output head tied to the bf16 embedding"
    )
    export.add_argument(
        "--method", choices=("gptq", "rtn"), default="gptq",
        help="how the 4-bit codes are chosen: GPTQ on calibration text, or round-to-nearest",
    )  # fmt: skip
    export.add_argument(
        "--out", type=Path, default=None, help="write here instead of the models directory's cache"
    )

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "fetch":
        from quant.resolve import gguf_for_known, resolve_model

        print(gguf_for_known(args.model) if args.gguf else resolve_model(args.model).path)
    elif args.command == "convert":
        from quant.convert import convert_gguf

        print(convert_gguf(args.gguf, args.out))
    elif args.command == "bench":
        return _bench(args)
    elif args.command == "export":
        return _export(args)
    return 0


def _export(args) -> int:
    from quant.export_vllm import ExportError, ExportSettings, export
    from quant.gptq import GPTQError

    settings = ExportSettings(
        group_size=args.group_size, quantise_head=not args.no_head, method=args.method
    )
    try:
        print(export(args.model, settings, out=args.out))
    except (ExportError, GPTQError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    from quant.bench import LevelError, Protocol, render, run, write

    protocol = Protocol(args.window, args.stride, args.windows, args.decode_tokens)
    levels = [level.strip() for level in args.levels.split(",")]
    try:
        result = run(args.model, levels, protocol, args.llamacpp_python)
    except LevelError as error:
        print(f"error: --levels: {error}", file=sys.stderr)
        return 2
    print(render(result))
    for path in write(result, args.out, f"quant_{Path(args.model).name}"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
