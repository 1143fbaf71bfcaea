"""One worker process: its backend server (or, with --models, a server per loaded model), a dramatiq
Worker on the streams broker, its actors.

Started by workers.supervisor (its entry point is workers.boot, which launches a single-model
worker's server first), which vouches for it in Redis and replaces it if it dies. The process leads
its own process group, so its servers (in that group) can be killed with it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import dramatiq
import httpx
import redis

from jobcontract import protocol
from jobcontract.broker import StreamsBroker
from jobcontract.connection import connect
from jobcontract.fleet import FleetCache
from jobcontract.jobs import JobStore
from jobcontract.keys import Keys, actor_name, parse_queue, queue_name
from jobcontract.models import Lane
from jobcontract.outage import OUTAGE_ERRORS
from jobcontract.protocol.placement import ReadModels, WorkerModels
from jobcontract.scheduling import Placement, TakePlan, plan
from workers.cancellation import CancelWatch
from workers.circuit import CircuitBreaker
from workers.metrics import ModelMetrics, WorkerMetrics
from workers.models.manager import ModelSet
from workers.models.publisher import ModelsPublisher
from workers.models.sizes import ModelSizes, file_size_bytes, resident_bytes
from workers.rerouting import Rerouting, ReroutingByModel
from workers.runner import JobRunner
from workers.servers import specs
from workers.servers.supervisor import JobServer, Launched, ServerSupervisor
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# How often a process started while Redis is down tries it again.
REDIS_WAIT_S = 1.0
# How often a process waiting for its supervisor's first vouch looks whether it was told to stop.
VOUCH_POLL_S = 0.1


class Waitable(Protocol):
    """An event set by another process (multiprocessing's) or thread."""

    def wait(self, timeout: float | None = None) -> bool: ...


# Interactive work is taken from a process's prefetched messages before batch work.
LANE_PRIORITY = {Lane.INTERACTIVE: 0, Lane.BATCH: 10}


def serve(
    settings: WorkerSettings,
    consumer_name: str,
    stop: threading.Event,
    *,
    on_ready: Callable[[], None] | None = None,
    launched: Launched | None = None,
    vouched: Waitable | None = None,
) -> int:
    """Serve the worker's model (`--model`, its server started first) or models (`--models`, each
    loaded on demand by a ModelSet): one JobRunner and one Rerouting per model, one dramatiq Worker
    reading every model's queues, until `stop`, then finish in-flight jobs. A single-model worker's
    server may be `launched` already (workers.boot starts it before importing this module); else it
    is started here. A multi-model worker is never given one: its servers start on demand, when a
    job needs their model, so there is nothing to start early. No queue is read before `vouched`
    (the supervisor's first vouch: workers.spawner) is set."""
    models = settings.served_models()
    backend = settings.backend
    keys = Keys(settings.namespace)
    client = connect(settings.redis_url)
    metrics = WorkerMetrics(models[0], backend.value)
    views = {m: metrics if i == 0 else metrics.also_serving(m, backend.value) for i, m in enumerate(models)}
    model_metrics = ModelMetrics(backend.value)
    routes = {m: settings.routes.get(m).backend(backend) for m in models}
    sizes = ModelSizes({m: file_size_bytes(routes[m].path) for m in models})
    runners: dict[str, JobRunner] = {}
    on_any_state: list[Callable[[], None]] = []  # the models publisher's poke, once it exists

    def make_server(model: str, on_state: Callable[[str], None] | None = None) -> ServerSupervisor:
        labels = {"model": model, "backend": backend.value}

        def on_server_state(state: str) -> None:
            metrics.server_up.labels(**labels).set(1 if state in ("ready", "restarted") else 0)
            if state == "restarted":
                metrics.server_restarts.labels(**labels).inc()
            if on_state is not None:
                on_state(state)
            for poke in on_any_state:
                poke()

        return ServerSupervisor(
            specs.for_model(settings, model),
            log_path=Path(specs.log_path(settings, model).format(pid=os.getpid())),
            start_timeout_s=settings.server_start_timeout_s,
            hang_timeout_s=settings.server_hang_timeout_s,
            on_state=on_server_state,
            start_again_on_exit=not settings.multi_model,
        )

    model_set: ModelSet | None = None
    single: ServerSupervisor | None = None
    servers: dict[str, JobServer]
    if settings.multi_model:
        model_set = ModelSet(
            specs={m: specs.for_model(settings, m) for m in models},
            sizes=sizes,
            budget_bytes=settings.budget_bytes_per_process(),
            keep_alive_s=settings.model_keep_alive_s,
            make_server=make_server,
            metrics=model_metrics,
            load_wait_s=settings.server_start_timeout_s,
        )
        servers = dict(model_set.handles)
    else:
        single = make_server(models[0])
        model_metrics.create_series(models[0])
        if launched is not None:  # loading since workers.boot started it, before this module's imports
            single.adopt(launched)
        servers = {models[0]: single}
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
    queues = {m: {lane.value: queue_name(m, backend, lane) for lane in Lane} for m in models}
    reroutings: dict[str, Rerouting] = {}
    for model in models:
        runners[model] = JobRunner(
            store=store,
            server=servers[model],
            route=routes[model],
            worker_name=consumer_name,
            queue_for_lane=queues[model],
            http=http,
            cancels=cancels,
            metrics=views[model],
        )
        reroutings[model] = Rerouting(
            store=store,
            route=settings.routes.get(model),
            backend=backend,
            circuit=CircuitBreaker(
                client,
                keys,
                model,
                threshold=settings.circuit_threshold,
                cool_down_s=settings.circuit_cool_down_s,
            ),
            metrics=views[model],
            worker_name=consumer_name,
        )
    broker = StreamsBroker(
        client,
        keys,
        consumer_name=consumer_name,
        middleware=[reroutings[models[0]] if single is not None else ReroutingByModel(reroutings)],
        outage_patience_s=settings.redis_outage_patience_s,
        dead_letter_cap=settings.dead_letter_cap,
    )
    broker.planner = planner(settings, model_set, others_loaded(client, keys, consumer_name), broker.held)
    if model_set is not None:
        model_set.watch_held(lambda: held_by_model(broker.held()))
        broker.gate = gate(model_set)
    if not wait_for_redis(client, stop):  # told to stop before Redis came back
        if single is not None:
            single.stop()
        return 0
    declare_actors(broker, runners, queues)

    def record() -> WorkerModels:
        if model_set is not None:
            loaded, used, budget = model_set.loaded(), model_set.used_bytes(), model_set.budget_bytes
        else:
            assert single is not None
            resident = None if single.pid is None else resident_bytes(single.pid)
            if resident is not None:
                sizes.measured(models[0], resident)
            loaded = models if single.ready.is_set() else []
            used, budget = sizes.size(models[0]), None
            model_metrics.loaded.labels(**model_metrics.labels(models[0])).set(1 if loaded else 0)
            model_metrics.size.labels(**model_metrics.labels(models[0])).set(used)
            model_metrics.loaded_count.set(len(loaded))
            model_metrics.used.set(used)
        return WorkerModels(
            worker=consumer_name,
            host=settings.host,
            backend=backend.value,
            budget_bytes=budget,
            serves=tuple(models),
            loaded=tuple(loaded),
            sizes={m: sizes.size(m) for m in models},
            used_bytes=used,
        )

    publisher = ModelsPublisher(client, keys, record, ttl_s=settings.liveness_ttl_s)
    on_any_state.append(publisher.poke)
    if model_set is not None:
        model_set.when_changed(publisher.poke)
    worker = dramatiq.Worker(broker, worker_threads=settings.concurrency, worker_timeout=1000)
    # Hold no more than can run, plus a little, so other processes get the rest of the queue.
    worker.queue_prefetch = settings.concurrency + 2
    if single is not None:
        # All of the above was made while the server loads: the process serves the moment it is ready.
        started = launched.started if launched is not None else time.monotonic()
        single.start()  # its one load, counted as one
        model_metrics.loads.labels(**model_metrics.labels(models[0])).inc()
        model_metrics.load_seconds.labels(**model_metrics.labels(models[0])).observe(time.monotonic() - started)
    if model_set is not None:
        model_set.start()
    publisher.start()
    while vouched is not None and not vouched.wait(VOUCH_POLL_S) and not stop.is_set():
        pass
    if not stop.is_set():
        worker.start()
        if on_ready is not None:
            on_ready()
    if single is not None:
        log.info(
            "serving %s on %s at %s with %d slots", models[0], single.spec.name, single.base_url, settings.concurrency
        )
    else:
        log.info("serving %s on demand within %d bytes", ", ".join(models), settings.budget_bytes_per_process())
    stop.wait()
    log.info("stopping: finishing in-flight jobs (grace %.0fs)", settings.shutdown_grace_s)
    worker.stop(timeout=int(settings.shutdown_grace_s * 1000))
    publisher.stop()
    cancels.stop()
    if model_set is not None:
        model_set.stop()
    if single is not None:
        single.stop()
    http.close()
    return 0


def planner(
    settings: WorkerSettings,
    model_set: ModelSet | None,
    others_loaded: Callable[[], frozenset[str]],
    held: Callable[[], dict[str, int]],
) -> Callable[[str], TakePlan]:
    """Where this process's consumers take from next (jobcontract.scheduling): by prompt prefix, and
    with several models by what this worker holds and has loaded and what the others have loaded.
    A model this process holds jobs of counts as loaded here (it is committed to it: the jobs wait
    for its load), and jobs held of other models are work a swap would displace, so the first
    consumer to take for an unloaded model commits the process and the others wait their turn (takes
    are serialised). A swap that would unload only idle models displaces nothing: it is taken for jobs
    that waited long enough (ModelSet.swap_wait)."""
    base = Placement(
        prefix_affinity=settings.prefix_affinity,
        steal_after_s=settings.prefix_steal_after_s,
        max_swap_wait_s=settings.max_swap_wait_s,
    )

    def for_queue(queue: str) -> TakePlan:
        ref = parse_queue(queue)
        if model_set is None or ref is None:
            return plan(queue, base)
        draining = model_set.draining(ref.model)  # being emptied for a swap: take nothing new for it
        loaded = ref.model in model_set.loaded() and not draining
        holding = set(held_by_model(held()))
        others = holding - {ref.model}
        swap_wait = 0.0 if loaded else model_set.swap_wait(ref.model, also=others)
        placement = replace(
            base,
            loaded_here=loaded,
            loaded_elsewhere=ref.model in others_loaded(),
            busy_here=swap_wait is None,
            swap_after_s=swap_wait or 0.0,
            swap_needed=not loaded and model_set.would_swap(ref.model, also=others),
            committed_here=ref.model in holding or draining,
            since_turn_s=model_set.since_turn(ref.model),
            may_block=loaded,
            may_idle=False,  # a load or swap here changes what to read, with no partition made
        )
        return plan(queue, placement)

    return for_queue


def held_by_model(held: dict[str, int]) -> dict[str, int]:
    """Model -> jobs this process holds (taken, not settled), from the consumers' counts per queue."""
    counts: dict[str, int] = {}
    for queue, count in held.items():
        ref = parse_queue(queue)
        if ref is not None and count:
            counts[ref.model] = counts.get(ref.model, 0) + count
    return counts


def gate(model_set: ModelSet) -> Callable[[str], bool]:
    """The consumers' gate of a multi-model process: a queue's held jobs go to worker threads once
    their model may run them (ModelSet.runnable); until then they wait in their consumer, so every
    thread stays free for the models that are loaded."""

    def may_run(queue: str) -> bool:
        ref = parse_queue(queue)
        return ref is None or ref.delayed or model_set.runnable(ref.model)

    return may_run


def others_loaded(client: redis.Redis, keys: Keys, me: str) -> Callable[[], frozenset[str]]:
    """The models other live workers hold loaded, from their published records (read at most once a
    second: jobcontract.fleet)."""
    cache = FleetCache()

    def read() -> frozenset[str]:
        try:
            fleet = cache.get(lambda: protocol.run(client, ReadModels(keys)))
        except redis.RedisError:
            return frozenset()  # Redis away: the take fails too, and is tried again
        return frozenset(m for record in fleet if record.worker != me for m in record.loaded)

    return read


def wait_for_redis(client: redis.Redis, stop: threading.Event) -> bool:
    """Wait, with the server loaded, for a Redis that is down as the process starts: exiting instead
    would have the supervisor start another process (and load the model again) every few seconds
    until Redis is back. False when `stop` comes first."""
    waiting = False
    while not stop.is_set():
        try:
            client.ping()
            if waiting:
                log.info("redis is back: serving")
            return True
        except OUTAGE_ERRORS as error:
            if not waiting:
                log.warning("redis unreachable (%s): waiting for it before reading any queue", error)
                waiting = True
            stop.wait(REDIS_WAIT_S)
    return False


def declare_actors(broker: dramatiq.Broker, runners: dict[str, JobRunner], queues: dict[str, dict[str, str]]) -> None:
    """One actor per lane (a message names its lane's actor, not its model), declared on the first
    model's queue; every other model's queues are declared too, so the worker reads them all, and
    the actor hands each job to its model's runner."""
    first = next(iter(runners))
    for lane in Lane:
        declare = dramatiq.actor(
            actor_name=actor_name(lane),
            queue_name=queues[first][lane.value],
            priority=LANE_PRIORITY[lane],
            broker=broker,
        )
        run = runners[first].run if len(runners) == 1 else _by_model(runners)
        declare(_named(run, actor_name(lane)))
        for model in runners:
            if model != first:
                broker.declare_queue(queues[model][lane.value])


def _by_model(runners: dict[str, JobRunner]) -> Callable[..., None]:
    def run(job_id: str, request: dict[str, Any], attempts: list[dict[str, Any]], **kwargs: Any) -> None:
        runners[str(request["model"])].run(job_id, request, attempts, **kwargs)

    return run


def _named(function: Any, name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
