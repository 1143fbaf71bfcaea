"""`genq worker`: a small parent that keeps N worker processes alive and vouches for them.

Why a parent: plain `dramatiq` stops every process when one dies; here a dead process is reaped
(its server's process group killed), its jobs handed back at once, and a new one started while
the others keep serving. And because the parent, not the worker, renews each worker's liveness
key in Redis, a worker whose thread holds the GIL in native code for minutes is still vouched
for, while a dead host's keys simply expire: Redis's own clock decides, so host clocks may drift.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from jobcontract import protocol
from jobcontract.connection import connect, redact
from jobcontract.keys import Keys, pool_name
from jobcontract.protocol.liveness import Vouch
from jobcontract.protocol.placement import WithdrawModels
from workers.settings import WorkerSettings
from workers.spawner import Child, Spawner

if TYPE_CHECKING:
    from jobcontract.broker import StreamsBroker
    from workers.rescue import Rescuer

log = logging.getLogger(__name__)

# Children are looked at when one exits (its sentinel wakes the supervisor), when a vouch or the chores
# are due, and this often while one is starting, so a worker joins its pool the moment it serves.
READY_POLL_S = 0.02
# A vouch or chore Redis failed is tried again this soon.
RETRY_S = 0.5


def vouch_every_s(liveness_ttl_s: float) -> float:
    """Liveness keys are renewed four times per TTL (so two missed renewals never let a live worker's
    key expire), no more often than every 0.5 s and at least every 5 s. Each renewal is one Redis call
    per supervisor: a fleet of idle workers must not keep Redis busy."""
    return min(5.0, max(0.5, liveness_ttl_s / 4))


def chores_every_s(liveness_ttl_s: float) -> float:
    """Handing back dead consumers' entries and rescuing orphaned pools cost a dozen Redis calls a
    pass; a dead consumer is only found once its key expired (a TTL), so twice per TTL is enough."""
    return min(10.0, max(0.5, liveness_ttl_s / 2))


class WorkerPool:
    def __init__(
        self, settings: WorkerSettings, spawner: Spawner | None = None, children: Iterable[Child] = ()
    ) -> None:
        """`children`: processes `spawner` started before this module was imported (genq worker
        spawns them first, so their servers load meanwhile); run() starts the rest."""
        self.settings = settings
        self.spawner = spawner or Spawner(settings)
        self.keys = Keys(settings.namespace)
        self.client = connect(settings.redis_url)
        self.models = settings.served_models()
        # A multi-model worker joins every model's pool: it can take any of their jobs (loading the
        # model on demand), so none of them is "served by nobody" while it lives.
        self.pool_names = [pool_name(m, settings.backend) for m in self.models]
        self.pools = [self.keys.pool(p) for p in self.pool_names]
        self.children: list[Child] = list(children)
        self.stopping = threading.Event()
        self._crashes: list[float] = []
        self._vouch_every_s = vouch_every_s(settings.liveness_ttl_s)
        self._chores_every_s = chores_every_s(settings.liveness_ttl_s)
        self._next_vouch = 0.0
        self._next_chores = 0.0
        self._wakeup_read, self._wakeup_write = os.pipe()  # stop() wakes the wait on children
        os.set_blocking(self._wakeup_write, False)

    # The broker and the rescuer import dramatiq and the queue protocol: made when first needed, after
    # the children are spawned, so this import does not delay their start.
    @functools.cached_property
    def broker(self) -> StreamsBroker:
        from jobcontract.broker import StreamsBroker

        return StreamsBroker(
            self.client,
            self.keys,
            consumer_name=f"supervisor:{self.settings.host}:{os.getpid()}",
            middleware=[],
            dead_letter_cap=self.settings.dead_letter_cap,
        )

    @functools.cached_property
    def rescuer(self) -> Rescuer:
        from workers.rescue import Rescuer

        return Rescuer(
            self.client,
            self.keys,
            self.settings.routes,
            name=self.broker.consumer_name,
            rescue_after_s=self.settings.rescue_after_s,
        )

    def run(self) -> int:
        log.info(
            "genq worker: %d x %s on %s, redis %s",
            self.settings.processes,
            ",".join(self.models),
            self.settings.backend.value,
            redact(self.settings.redis_url),
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        try:  # the children spawned before this pool existed are stopped whatever fails here
            self._start_metrics()
            while len(self.children) < self.settings.processes:
                self.children.append(self._spawn())
            while not self.stopping.is_set():
                self._wait(self._pause())
                if self.stopping.is_set():
                    break
                self._tend()
        finally:
            self._shutdown()
            if self.spawner.metrics_dir is not None:
                shutil.rmtree(self.spawner.metrics_dir, ignore_errors=True)
        return 0

    def stop(self) -> None:
        """Stop serving (a signal handler's call too): the wait on the children ends at once."""
        self.stopping.set()
        with contextlib.suppress(OSError):  # full or closed: it is awake anyway
            os.write(self._wakeup_write, b"x")

    def _wait(self, timeout: float) -> None:
        """Until a child exits, stop() is called, or `timeout` passes: an idle supervisor wakes only
        for its vouches and chores, not twice a second to look at its children (issue #12)."""
        ready = multiprocessing.connection.wait(
            [self._wakeup_read, *(c.process.sentinel for c in self.children)], timeout=max(0.0, timeout)
        )
        if self._wakeup_read in ready:
            os.read(self._wakeup_read, 64)

    # -- one pass of care --------------------------------------------------------------------------
    def _tend(self) -> None:
        for child in list(self.children):
            if child.process.is_alive():
                continue
            log.warning("worker %s exited with %s; replacing it", child.name, child.process.exitcode)
            self._bury(child)
            self.children.remove(child)
            self._crashes.append(time.monotonic())
            self._crashes = [t for t in self._crashes if time.monotonic() - t < 60]
            if len(self._crashes) > 10:  # a crash loop: back off instead of spinning
                self.stopping.wait(5.0)
            if not self.stopping.is_set():
                self.children.append(self._spawn())
        now = time.monotonic()
        try:
            if now >= self._next_vouch or any(c.ready.is_set() and not c.joined for c in self.children):
                self._vouch_for(self.children)
                self._next_vouch = now + self._vouch_every_s
            if now >= self._next_chores:
                # Due again just before the vouch that many vouches on: the chores ride on a vouch's
                # wake-up instead of one of their own (the supervisor sleeps between the two).
                self._next_chores = now + self._chores_every_s - self._vouch_every_s / 2
                self.broker.reclaim_dead_consumers()
                if any(c.ready.is_set() for c in self.children):  # only a serving pool takes others' work
                    self.rescuer.run_once()
        except redis.RedisError as error:
            log.warning("redis unreachable from the supervisor (%s); workers keep their jobs", error)

    def _pause(self) -> float:
        """Until the next look: short while a child is starting (it joins its pool as soon as it serves),
        else until a vouch or the chores are due (a child's exit ends the wait sooner)."""
        starting = any(not c.ready.is_set() and c.process.is_alive() for c in self.children)
        if starting:
            return READY_POLL_S
        due = min(self._next_vouch, self._next_chores + self._vouch_every_s / 2)
        left = due - time.monotonic()
        return left if left > 0 else RETRY_S  # overdue: Redis failed the last try

    def _vouch_for(self, children: list[Child], *, serving: bool = True) -> None:
        """Renew each child's liveness key; add the ready ones to the pool set unless `serving` is off."""
        if not children:
            return
        for pool in self.pool_names:
            vouch = Vouch(
                self.keys,
                pool,
                workers=[c.name for c in children],
                ready=[serving and c.ready.is_set() for c in children],
                ttl_ms=int(self.settings.liveness_ttl_s * 1000),
            )
            protocol.run(self.client, vouch)
        for child in children:
            child.joined = serving and child.ready.is_set()
            child.vouched.set()  # it may read its queues now

    def _spawn(self) -> Child:
        child = self.spawner.spawn()
        with contextlib.suppress(redis.RedisError):  # else the next vouch lets it read
            self._vouch_for([child])
        return child

    def _bury(self, child: Child) -> None:
        """Kill what the dead worker left (its server, in its process group), then hand its jobs back."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid or 0, signal.SIGKILL)
        self._mark_metrics_dead(child)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.keys.alive(child.name))
            for pool in self.pools:
                self.client.zrem(pool, child.name)
            protocol.run(self.client, WithdrawModels(self.keys, [child.name]))
            moved = self.broker.reclaim_dead_consumers()
            if moved:
                log.info("handed back %d job(s) of %s", moved, child.name)

    def _shutdown(self) -> None:
        """Stop every child, vouching for each until the moment it exits: a draining worker still holds
        its jobs, and a liveness key left to expire meanwhile would let other workers' janitors hand
        them out to run a second time. It no longer serves, so it leaves the pool set at once."""
        log.info("stopping %d worker(s), grace %.0fs", len(self.children), self.settings.shutdown_grace_s)
        with contextlib.suppress(redis.RedisError):
            if self.children:
                for pool in self.pools:
                    self.client.zrem(pool, *(c.name for c in self.children))
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                if child.process.pid:
                    os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 10
        draining = list(self.children)
        while draining:
            for child in [c for c in draining if not c.process.is_alive()]:
                self._bury(child)
                draining.remove(child)
            if not draining:
                break
            if time.monotonic() > deadline:
                for child in draining:
                    log.warning("worker %s did not stop in time; killing it", child.name)
                    self._bury(child)
                break
            with contextlib.suppress(redis.RedisError):
                self._vouch_for(draining, serving=False)
            draining[0].process.join(timeout=min(self._vouch_every_s, max(0.0, deadline - time.monotonic())))
        self.children.clear()

    # -- metrics across processes ------------------------------------------------------------------
    def _start_metrics(self) -> None:
        """Serve the metrics every worker process writes to the spawner's folder (Spawner._metrics_dir)."""
        directory = self.spawner.metrics_dir
        if directory is None or self.settings.metrics_port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        start_http_server(self.settings.metrics_port, addr="0.0.0.0", registry=registry)
        log.info("metrics of all worker processes on :%d/metrics", self.settings.metrics_port)

    def _mark_metrics_dead(self, child: Child) -> None:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ and child.process.pid:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.process.pid)
