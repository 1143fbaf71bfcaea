"""`genq metrics`: one small process that serves the cluster-level collector over HTTP.

Run one per cluster (anywhere that reaches Redis): every instance would report the same queues.
"""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import CollectorRegistry, start_http_server
from pydantic import Field

from jobcontract.connection import connect, redact
from jobcontract.keys import Keys
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings
from workers.queue_collector import QueueCollector

log = logging.getLogger(__name__)


class ClusterMetricsSettings(GenqSettings):
    cluster_metrics_host: str = Field(default="0.0.0.0", description="Address `genq metrics` listens on.")
    cluster_metrics_port: int = Field(default=9102, ge=1, le=65535, description="Port of `genq metrics`.")


def expected_pools(settings: GenqSettings) -> list[tuple[str, Backend]]:
    """Every pool of the routes (the same routes callers admit jobs by), shown even before a worker
    ever declared its queues: a pool that never came up is what "no worker ready" is for."""
    return [(model.name, backend) for model in settings.routes.models for backend in model.order]


def build_registry(settings: GenqSettings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QueueCollector(connect(settings.redis_url), Keys(settings.namespace), expected_pools(settings)))
    return registry


def serve(settings: ClusterMetricsSettings, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server, thread = start_http_server(
        settings.cluster_metrics_port, addr=settings.cluster_metrics_host, registry=build_registry(settings)
    )
    log.info(
        "cluster metrics of %s (namespace %s) on %s:%d/metrics",
        redact(settings.redis_url),
        settings.namespace,
        settings.cluster_metrics_host,
        settings.cluster_metrics_port,
    )
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    return 0
