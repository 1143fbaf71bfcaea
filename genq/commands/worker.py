"""`genq worker`: worker processes that each own a backend server."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    worker = sub.add_parser("worker", help="run worker processes that each own a backend server")
    worker.add_argument("--model", help="logical model from the routes (GENQ_MODEL)")
    worker.add_argument("--backend", choices=["mlx", "llamacpp"], help="GENQ_BACKEND")
    worker.add_argument("--processes", type=int, help="GENQ_PROCESSES")
    worker.add_argument("--concurrency", type=int, help="requests in flight per process (GENQ_CONCURRENCY)")
    worker.add_argument("--metrics-port", type=int, help="serve /metrics for all processes (GENQ_METRICS_PORT)")
    worker.add_argument("--llama-server", help="path of a llama-server binary (GENQ_LLAMA_SERVER_BIN)")
    worker.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    from workers.settings import WorkerSettings
    from workers.supervisor import WorkerPool

    given = {
        "model": args.model,
        "backend": args.backend,
        "processes": args.processes,
        "concurrency": args.concurrency,
        "metrics_port": args.metrics_port,
        "llama_server_bin": args.llama_server,
    }
    return WorkerPool(WorkerSettings(**{k: v for k, v in given.items() if v is not None})).run()
