"""The producer of the scale benchmark, in a process of its own so its peak RSS is the producer's
alone: it streams a JSONL file of requests into genq in chunks with the Python client (keeping
every job id, as a caller collecting results must) and prints one JSON line with what it measured.

    python -m bench.producer_load FILE --redis-url URL --namespace NS [--routes-file F] [--chunk 1000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from jobcontract.settings import GenqSettings
from producer.client import Client


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.producer_load")
    parser.add_argument("file", type=Path)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--routes-file", type=Path)
    parser.add_argument("--chunk", type=int, default=1000)
    args = parser.parse_args(argv)
    settings = GenqSettings(
        redis_url=args.redis_url,
        namespace=args.namespace,
        routes_file=args.routes_file,
        max_queued_jobs=100_000_000,
        **({"models_dir": args.models_dir} if args.models_dir else {}),
    )
    job_ids: list[str] = []
    started = time.perf_counter()
    batch_id = uuid.uuid4().hex
    rss_at_start = peak_rss_mb()
    with Client(settings) as client, args.file.open() as lines:
        while chunk := list(itertools.islice(lines, args.chunk)):
            job_ids += client.submit_many([json.loads(line) for line in chunk], batch_id=batch_id)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "jobs": len(job_ids),
                "seconds": seconds,
                "jobs_per_s": len(job_ids) / seconds if seconds else None,
                "peak_rss_mb": peak_rss_mb(),
                "peak_rss_before_submitting_mb": rss_at_start,
                "chunk": args.chunk,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
