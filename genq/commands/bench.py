"""`genq bench all|throughput|overhead|failover|lifecycle|scale [--size ci|small|full]`: genq's
figures measured beside what they are compared to, written as JSON and Markdown to bench/results/.

The benchmarks live in the source checkout's bench/ package (they start workers, servers and a
private Redis of their own), so this command imports it only when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

BENCHMARKS = ("throughput", "overhead", "failover", "lifecycle", "scale")


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (a private Redis, real workers and servers); results in bench/results/",
        description="A benchmark reports: it exits non-zero only when it could not run, never on a time.",
    )
    bench.add_argument("benchmark", choices=["all", *BENCHMARKS])
    bench.add_argument(
        "--size",
        choices=["ci", "small", "full"],
        default="small",
        help="ci: seconds each; small (default): a few minutes for all on 2 cores; full: more samples",
    )
    bench.add_argument("--out", help="where the JSON and Markdown go (default: bench/results/)")
    bench.add_argument("--models-dir", help="where the tiny model is built (default: GENQ_MODELS_DIR)")
    bench.add_argument("--llama-server", help="llama-server binary for the failover benchmark")
    bench.add_argument("--keep-logs", action="store_true", help="keep the worker and server logs")
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from bench.report import DEFAULT_RESULTS, Options, Size
        from bench.runner import BENCHMARKS as KNOWN
        from bench.runner import run_many
    except ImportError as error:
        raise RuntimeError(f"genq bench runs from a genq source checkout (bench/ not importable: {error})") from error

    options = Options(
        size=Size(args.size),
        out_dir=Path(args.out) if args.out else DEFAULT_RESULTS,
        models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
        llama_server=args.llama_server,
        keep_logs=args.keep_logs,
    )
    return run_many(list(KNOWN) if args.benchmark == "all" else [args.benchmark], options)
