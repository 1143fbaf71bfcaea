"""`genq worker`: worker processes that each own a backend server."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    worker = sub.add_parser("worker", help="run worker processes that each own a backend server")
    worker.add_argument("--model", help="logical model from the routes, always loaded (GENQ_MODEL)")
    worker.add_argument(
        "--models",
        help="several models loaded on demand within the memory budget: a,b,c or all (GENQ_SERVE_MODELS)",
    )
    worker.add_argument(
        "--memory-budget-gb", type=float, help="memory for loaded models, GiB (GENQ_MEMORY_BUDGET_GB; 0.75 of RAM)"
    )
    worker.add_argument(
        "--keep-alive", type=float, help="unload a model idle this many seconds (GENQ_MODEL_KEEP_ALIVE_S)"
    )
    worker.add_argument("--backend", choices=["mlx", "llamacpp"], help="GENQ_BACKEND")
    worker.add_argument("--processes", type=int, help="GENQ_PROCESSES")
    worker.add_argument("--concurrency", type=int, help="requests in flight per process (GENQ_CONCURRENCY)")
    worker.add_argument("--metrics-port", type=int, help="serve /metrics for all processes (GENQ_METRICS_PORT)")
    worker.add_argument("--llama-server", help="path of a llama-server binary (GENQ_LLAMA_SERVER_BIN)")
    worker.add_argument(
        "--prompt-cache-size", type=int, help="mlx_lm.server prompt caches kept (GENQ_PROMPT_CACHE_SIZE)"
    )
    worker.add_argument(
        "--prompt-cache-bytes", type=int, help="mlx_lm.server prompt cache cap, 0: none (GENQ_PROMPT_CACHE_BYTES)"
    )
    worker.add_argument(
        "--no-prefix-affinity",
        dest="prefix_affinity",
        action="store_const",
        const=False,
        help="take jobs without regard to which worker holds their prompt prefix (GENQ_PREFIX_AFFINITY=false)",
    )
    worker.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    from workers import prelaunch

    # This command line's last run's processes, launching its servers while the settings are read.
    command = {k: v for k, v in vars(args).items() if k != "run"}
    early = prelaunch.spawn_remembered(command)
    try:
        from workers.settings import WorkerSettings
        from workers.spawner import Spawner

        given = {
            "model": args.model,
            "serve_models": args.models,
            "memory_budget_gb": args.memory_budget_gb,
            "model_keep_alive_s": args.keep_alive,
            "backend": args.backend,
            "processes": args.processes,
            "concurrency": args.concurrency,
            "metrics_port": args.metrics_port,
            "llama_server_bin": args.llama_server,
            "prompt_cache_size": args.prompt_cache_size,
            "prompt_cache_bytes": args.prompt_cache_bytes,
            "prefix_affinity": args.prefix_affinity,
        }
        settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
        # The worker processes first, each starting its server: the models load while the supervisor
        # imports its Redis client and queue protocol (workers.spawner).
        spawner = Spawner(settings)
        children = spawner.adopt(early[: settings.processes])
    except BaseException:
        for spawned in early:
            spawned.abort()
        raise
    for spawned in early[settings.processes :]:
        spawned.abort()
    children += [spawner.spawn() for _ in range(settings.processes - len(children))]
    prelaunch.remember(command, spawner.launch, settings.processes)
    from workers.supervisor import WorkerPool

    return WorkerPool(settings, spawner, children).run()
