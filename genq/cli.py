"""The `genq` command. Each subcommand imports only its own side: a caller's machine needs no
worker dependencies (mlx, servers) and a worker's none of the gateway's."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from genq.commands import batch, bench, demo, dlq, gateway, jobs, metrics, models, worker

# Each module adds its own subcommands; a new group is one module and one entry here.
COMMAND_GROUPS = [demo, worker, models, jobs, metrics, batch, bench, gateway, dlq]


def quiet_libraries() -> None:
    """One line per request from httpx would drown what matters."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genq", description="LLM generation jobs through Redis.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_libraries()
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        code = 130
    except Exception as error:  # one clear line for the operator, the traceback with -v
        if args.verbose:
            raise
        from pydantic import ValidationError

        kind = "invalid request" if isinstance(error, ValidationError) else type(error).__name__
        print(f"genq: {kind}: {error}", file=sys.stderr)
        code = 2 if isinstance(error, ValidationError) else 1
    sys.exit(code)
