"""`python -m bench all|throughput|overhead|failover|lifecycle|scale|fairshare|prefix [--size ci|small|full]`
(what `genq bench` runs): genq's figures measured beside what they are compared to, written as JSON and
Markdown to bench/results/.

The benchmarks use genq (its local stack, its client); genq does not import them: `genq bench`
replaces itself with this module, so the two packages do not import each other in a loop.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.report import DEFAULT_RESULTS, Options, Size
from bench.runner import BENCHMARKS, run_many


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genq bench",
        description="Run the benchmarks (a private Redis, real workers and servers); results in bench/results/. "
        "A benchmark reports: it exits non-zero only when it could not run, never on a time.",
    )
    parser.add_argument("benchmark", choices=["all", *BENCHMARKS])
    parser.add_argument(
        "--size",
        choices=["ci", "small", "full"],
        default="small",
        help="ci: seconds each; small (default): a few minutes for all on 2 cores; full: more samples",
    )
    parser.add_argument("--out", help="where the JSON and Markdown go (default: bench/results/)")
    parser.add_argument("--models-dir", help="where the tiny model is built (default: GENQ_MODELS_DIR)")
    parser.add_argument("--llama-server", help="llama-server binary for the failover benchmark")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker and server logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        size=Size(args.size),
        out_dir=Path(args.out) if args.out else DEFAULT_RESULTS,
        models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
        llama_server=args.llama_server,
        keep_logs=args.keep_logs,
    )
    return run_many(list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark], options)


if __name__ == "__main__":
    sys.exit(main())
