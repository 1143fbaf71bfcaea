"""The plain-dramatiq side of the overhead benchmark: dramatiq's own Redis broker, its Results
backend and a no-op actor, nothing of genq.

The `dramatiq` command imports a module and runs the broker that module made the global one, so
when BENCH_DRAMATIQ_REDIS_URL is set (only in the worker the benchmark starts) this module builds
its broker at import time. The benchmark's own process calls `setup` with its private Redis.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

URL_ENV = "BENCH_DRAMATIQ_REDIS_URL"
QUEUE = "bench_noop"


def noop() -> int:
    return 0


def setup(url: str) -> tuple[RedisBroker, RedisBackend, Any]:
    """Broker, results backend and the declared no-op actor, with dramatiq's defaults otherwise."""
    broker = RedisBroker(url=url)
    backend = RedisBackend(url=url)
    broker.add_middleware(Results(backend=backend))
    actor = dramatiq.actor(actor_name="noop", queue_name=QUEUE, store_results=True, broker=broker)(noop)
    return broker, backend, actor


if os.environ.get(URL_ENV):
    BROKER, BACKEND, NOOP = setup(os.environ[URL_ENV])
    dramatiq.set_broker(BROKER)
