"""One worker process: its backend server, a dramatiq Worker on the streams broker, its actors.

Started by workers.supervisor, which vouches for it in Redis and replaces it if it dies. The
process leads its own process group, so its server (in that group) can be killed with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import httpx

from jobcontract.broker import StreamsBroker
from jobcontract.connection import connect
from jobcontract.jobs import JobStore
from jobcontract.keys import Keys, actor_name, queue_name
from jobcontract.models import Backend, Lane
from jobcontract.routes import BackendRoute
from jobcontract.scheduling import Placement, TakePlan, plan
from workers.cancellation import CancelWatch
from workers.circuit import CircuitBreaker
from workers.metrics import WorkerMetrics
from workers.rerouting import Rerouting
from workers.runner import JobRunner
from workers.servers.specs import (
    ServerSpec,
    find_llama_server,
    llama_cpp_python_spec,
    llama_server_spec,
    mlx_spec,
)
from workers.servers.supervisor import ServerSupervisor
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# Interactive work is taken from a process's prefetched messages before batch work.
LANE_PRIORITY = {Lane.INTERACTIVE: 0, Lane.BATCH: 10}


def server_spec(settings: WorkerSettings, route: BackendRoute) -> ServerSpec:
    if settings.backend is Backend.MLX:
        return mlx_spec(
            route.path,
            concurrency=settings.concurrency,
            max_tokens=settings.max_tokens_cap,
            hub_cache=settings.hub_cache,
            prompt_cache_size=settings.prompt_cache_size,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            processes=settings.processes,
        )
    binary = find_llama_server(settings.llama_server_bin)
    if binary is not None:
        return llama_server_spec(
            binary,
            route.path,
            slots=settings.concurrency,
            context_length=route.context_length,
            threads=settings.llama_threads,
        )
    return llama_cpp_python_spec(route.path, context_length=route.context_length, threads=settings.llama_threads)


def main(settings_json: str, consumer_name: str, ready: Any = None) -> None:
    """Entry point of a spawned worker process; `ready` is set once it serves."""
    settings = WorkerSettings.model_validate_json(settings_json)
    _lead_own_group_and_follow_parent()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {consumer_name} %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sys.exit(serve(settings, consumer_name, stop, on_ready=ready.set if ready is not None else None))


def serve(
    settings: WorkerSettings, consumer_name: str, stop: threading.Event, *, on_ready: Callable[[], None] | None = None
) -> int:
    route = settings.routes.get(settings.model).backend(settings.backend)
    model_route = settings.routes.get(settings.model)
    keys = Keys(settings.namespace)
    client = connect(settings.redis_url)
    metrics = WorkerMetrics(settings.model, settings.backend.value)
    labels = {"model": settings.model, "backend": settings.backend.value}

    def on_server_state(state: str) -> None:
        metrics.server_up.labels(**labels).set(1 if state in ("ready", "restarted") else 0)
        if state == "restarted":
            metrics.server_restarts.labels(**labels).inc()

    server = ServerSupervisor(
        server_spec(settings, route),
        log_path=settings.log_dir.expanduser() / f"{settings.model}.{settings.backend.value}.{os.getpid()}.log",
        start_timeout_s=settings.server_start_timeout_s,
        hang_timeout_s=settings.server_hang_timeout_s,
        on_state=on_server_state,
    )
    server.start()
    store = JobStore(
        client,
        keys,
        result_ttl_s=settings.result_ttl_s,
        max_queued=settings.max_queued_jobs,
        outage_patience_s=settings.redis_outage_patience_s,
    )
    cancels = CancelWatch(client, keys.cancel_channel)
    cancels.start()
    http = httpx.Client(
        limits=httpx.Limits(
            max_connections=settings.concurrency + 4, max_keepalive_connections=settings.concurrency + 4
        )
    )
    queues = {lane.value: queue_name(settings.model, settings.backend, lane) for lane in Lane}
    runner = JobRunner(
        store=store,
        server=server,
        route=route,
        worker_name=consumer_name,
        queue_for_lane=queues,
        http=http,
        cancels=cancels,
        metrics=metrics,
    )
    rerouting = Rerouting(
        store=store,
        route=model_route,
        backend=settings.backend,
        circuit=CircuitBreaker(
            client,
            keys,
            settings.model,
            threshold=settings.circuit_threshold,
            cool_down_s=settings.circuit_cool_down_s,
        ),
        metrics=metrics,
        worker_name=consumer_name,
    )
    broker = StreamsBroker(
        client,
        keys,
        consumer_name=consumer_name,
        middleware=[rerouting],
        outage_patience_s=settings.redis_outage_patience_s,
        dead_letter_cap=settings.dead_letter_cap,
        planner=planner(settings),
    )
    declare_actors(broker, runner, queues)
    worker = dramatiq.Worker(broker, worker_threads=settings.concurrency, worker_timeout=1000)
    # Hold no more than can run, plus a little, so other processes get the rest of the queue.
    worker.queue_prefetch = settings.concurrency + 2
    worker.start()
    if on_ready is not None:
        on_ready()
    log.info(
        "serving %s on %s at %s with %d slots", settings.model, server.spec.name, server.base_url, settings.concurrency
    )
    stop.wait()
    log.info("stopping: finishing in-flight jobs (grace %.0fs)", settings.shutdown_grace_s)
    worker.stop(timeout=int(settings.shutdown_grace_s * 1000))
    cancels.stop()
    server.stop()
    http.close()
    return 0


def planner(settings: WorkerSettings) -> Callable[[str], TakePlan]:
    """Where this process's consumers take from next (jobcontract.scheduling)."""
    placement = Placement(prefix_affinity=settings.prefix_affinity, steal_after_s=settings.prefix_steal_after_s)
    return lambda queue: plan(queue, placement)


def declare_actors(broker: dramatiq.Broker, runner: JobRunner, queues: dict[str, str]) -> None:
    for lane in Lane:
        declare = dramatiq.actor(
            actor_name=actor_name(lane), queue_name=queues[lane.value], priority=LANE_PRIORITY[lane], broker=broker
        )
        declare(_named(runner.run, actor_name(lane)))


def _named(function: Any, name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _lead_own_group_and_follow_parent() -> None:
    """Own process group (the server joins it; the supervisor kills it whole if this process dies),
    and stop gracefully when the supervisor dies: the kernel tells us on Linux, a watcher elsewhere."""
    with contextlib.suppress(PermissionError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    parent = os.getppid()

    def watch_parent() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
