"""`genq bench ...`: runs `python -m bench ...` from the source checkout (see bench/__main__.py).

The benchmarks start a private Redis, workers and servers through genq's local stack, so bench/
imports genq; genq only hands over to it (exec, no import), which keeps the two from importing
each other in a loop. `genq bench --help` is bench's own help.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]


def register(sub: Any) -> None:
    # Every argument, --help included, is bench's: this parser treats none of them as an option.
    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (a private Redis, real workers and servers); results in bench/results/",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("argv", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    if not (CHECKOUT / "bench" / "__main__.py").is_file():
        raise RuntimeError(f"genq bench runs from a genq source checkout (no bench/ beside {CHECKOUT / 'genq'})")
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench", *args.argv], {**os.environ, "PYTHONPATH": path})
