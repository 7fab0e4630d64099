"""python -m serve --model gemma-3-270m [--host 127.0.0.1] [--port 8000] [--config FILE.yaml]

Parse the settings, resolve the model, build the engine and the app, run uvicorn.
"""

from __future__ import annotations

import logging
import sys

from serve.config import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from serve.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
