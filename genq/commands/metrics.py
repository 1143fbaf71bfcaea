"""`genq metrics`: serve the cluster-level metrics (queues, pools, circuits, dead letters) from Redis."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    metrics = sub.add_parser(
        "metrics", help="serve cluster metrics read from Redis: queue depth and age, live workers, dead letters"
    )
    metrics.add_argument("--host", help="listen address (GENQ_CLUSTER_METRICS_HOST, default 0.0.0.0)")
    metrics.add_argument("--port", type=int, help="listen port (GENQ_CLUSTER_METRICS_PORT, default 9102)")
    metrics.set_defaults(run=_metrics)


def _metrics(args: argparse.Namespace) -> int:
    from workers.cluster_metrics import ClusterMetricsSettings, serve

    given = {"cluster_metrics_host": args.host, "cluster_metrics_port": args.port}
    return serve(ClusterMetricsSettings(**{k: v for k, v in given.items() if v is not None}))
