"""Cluster-level metrics read from Redis at scrape time: what no single worker can see.

Queue depth and the age of the oldest waiting job per queue (model, backend, lane) are what an
autoscaler needs, and none of the backends exports them; live workers per pool, open circuits
and dead letters say what is failing. They live in Redis, so one `genq metrics` process reads
them when Prometheus scrapes (three round trips whatever the number of queues and tenants) instead
of every worker exporting the same numbers.

Reading the layout of jobcontract.keys: a queue is its own stream plus one partition per tenant or tenant
and prefix shard (each
counted, then summed; waiting jobs are also reported per tenant). Acked entries are deleted from a
stream, so the entries still there are either delivered to a worker and not yet acked (the group's pending
count) or waiting; the first waiting entry follows the group's last-delivered id, and its id
holds the Redis-clock millisecond it was added.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from dramatiq.common import dq_name
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobcontract import protocol
from jobcontract.keys import CONSUMER_GROUP, Keys, parse_queue, partition_tenant, pool_name
from jobcontract.models import Backend, Lane
from jobcontract.protocol.liveness import LiveWorkers

log = logging.getLogger(__name__)

QUEUE = ("model", "backend", "lane")
POOL = ("model", "backend")


@dataclass(frozen=True, order=True)
class QueueName:
    model: str
    backend: Backend
    lane: Lane

    @property
    def name(self) -> str:
        return f"{self.model}.{self.backend.value}.{self.lane.value}"

    @classmethod
    def parse(cls, name: str) -> QueueName | None:
        """A delay queue names its base queue; anything else that is not genq's is None."""
        ref = parse_queue(name)
        return None if ref is None else cls(ref.model, ref.backend, ref.lane)


@dataclass(frozen=True)
class QueueState:
    queue: QueueName
    waiting: int  # in the stream, not yet delivered to any worker
    delivered: int  # delivered to a worker (running or prefetched), not yet acked
    delayed: int  # retries waiting out their backoff in the delay queue
    oldest_age_s: float  # how long the first waiting entry has waited; 0 when none waits
    waiting_by_tenant: tuple[tuple[str, int], ...] = ()  # waiting, per tenant (summed over its partitions)


@dataclass(frozen=True)
class PoolState:
    model: str
    backend: Backend
    workers: int  # vouched alive and ready by their supervisor, on Redis's clock
    circuit_open: bool


@dataclass(frozen=True)
class ClusterSnapshot:
    queues: list[QueueState]
    pools: list[PoolState]
    dead_letters: int


class QueueCollector(Collector):
    """A prometheus-client collector; register it on a registry and every scrape reads Redis.

    `expected_pools` (model, backend) are reported even before any worker declared their queues,
    so "no worker ready" can fire for a pool that never came up.
    """

    def __init__(self, client: redis.Redis, keys: Keys, expected_pools: Iterable[tuple[str, Backend]] = ()) -> None:
        self.client = client
        self.keys = keys
        self.expected_pools = sorted(set(expected_pools))

    def describe(self) -> Iterable[Metric]:
        return []  # names are not fixed up front; registering must not read Redis

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("genq_redis_up", "1 when the metrics collector could read Redis.")
        try:
            snapshot = self.snapshot()
        except redis.RedisError as error:
            log.warning("cannot read Redis for metrics: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._families(snapshot)

    def snapshot(self) -> ClusterSnapshot:
        queues = self._queue_names()
        pools = sorted({(q.model, q.backend) for q in queues} | set(self.expected_pools))

        lane_sets = self.client.pipeline(transaction=False)
        for queue in queues:
            lane_sets.smembers(self.keys.partitions(queue.name))
            lane_sets.smembers(self.keys.partitions(dq_name(queue.name)))
        sets = iter(lane_sets.execute(raise_on_error=False))
        partitions = {q: ([None, *_names(_ok(next(sets), []))], [None, *_names(_ok(next(sets), []))]) for q in queues}

        first = self.client.pipeline(transaction=False)
        first.time()
        first.xlen(self.keys.dead_letters)
        for queue in queues:
            members, delayed_members = partitions[queue]
            for member in members:
                stream = self.keys.partition(queue.name, member)
                first.xlen(stream)
                first.xinfo_groups(stream)
            for member in delayed_members:
                first.xlen(self.keys.partition(dq_name(queue.name), member))
        for model, backend in pools:
            first.exists(self.keys.circuit(pool_name(model, backend)))
        replies = iter(first.execute(raise_on_error=False))
        seconds, micros = _ok(next(replies), (0, 0))
        now_us = int(seconds) * 1_000_000 + int(micros)
        dead_letters = int(_ok(next(replies), 0))
        counts: list[_LaneCount] = []
        delayed: dict[QueueName, int] = {}
        for queue in queues:
            members, delayed_members = partitions[queue]
            for member in members:
                length, groups = int(_ok(next(replies), 0)), _ok(next(replies), [])
                group = next((g for g in groups if _text(g.get("name")) == CONSUMER_GROUP), None)
                pending = int(group["pending"]) if group else 0
                last_delivered = _text(group["last-delivered-id"]) if group else "0-0"
                counts.append(_LaneCount(queue, member, length, pending, last_delivered))
            delayed[queue] = sum(int(_ok(next(replies), 0)) for _ in delayed_members)
        circuits = [bool(_ok(next(replies), 0)) for _ in pools]

        second = self.client.pipeline(transaction=False)
        protocol.send(second, self.client, LiveWorkers(self.keys, pools))
        waiting_partitions = [c for c in counts if c.length - c.pending > 0]
        for part in waiting_partitions:
            stream = self.keys.partition(part.queue.name, part.partition)
            second.xrange(stream, min=_after(part.last_delivered), max="+", count=1)
        replies = iter(second.execute(raise_on_error=False))
        workers = [int(n) for n in _ok(next(replies), [0] * len(pools))]
        oldest_ms: dict[QueueName, int] = {}
        for part in waiting_partitions:
            entries = _ok(next(replies), [])
            if entries:
                first_ms = int(_text(entries[0][0]).split("-")[0])
                oldest_ms[part.queue] = min(first_ms, oldest_ms.get(part.queue, first_ms))

        now_ms = now_us // 1000
        return ClusterSnapshot(
            queues=[
                QueueState(
                    queue=queue,
                    waiting=sum(c.waiting for c in counts if c.queue == queue),
                    delivered=sum(c.pending for c in counts if c.queue == queue),
                    delayed=delayed[queue],
                    oldest_age_s=max(0.0, (now_ms - oldest_ms[queue]) / 1000) if queue in oldest_ms else 0.0,
                    waiting_by_tenant=_by_tenant(c for c in counts if c.queue == queue),
                )
                for queue in queues
            ],
            pools=[
                PoolState(model=model, backend=backend, workers=n, circuit_open=open_)
                for (model, backend), n, open_ in zip(pools, workers, circuits, strict=True)
            ],
            dead_letters=dead_letters,
        )

    def _queue_names(self) -> list[QueueName]:
        declared = {QueueName.parse(_text(raw)) for raw in self.client.smembers(self.keys.queues)}
        expected = {QueueName(model, backend, lane) for model, backend in self.expected_pools for lane in Lane}
        return sorted(q for q in declared | expected if q is not None)

    @staticmethod
    def _families(snapshot: ClusterSnapshot) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "genq_queue_jobs",
            "Jobs in a queue: waiting (not yet delivered), delivered (to a worker, not yet done), "
            "delayed (a retry waiting out its backoff).",
            labels=(*QUEUE, "state"),
        )
        age = GaugeMetricFamily(
            "genq_queue_oldest_age_seconds",
            "How long the oldest waiting job of a queue has waited there (0 when none waits).",
            labels=QUEUE,
        )
        by_tenant = GaugeMetricFamily(
            "genq_queue_tenant_waiting_jobs",
            "Jobs waiting in a queue, per tenant (each tenant has its own lane, served in turn).",
            labels=(*QUEUE, "tenant"),
        )
        for state in snapshot.queues:
            labels = [state.queue.model, state.queue.backend.value, state.queue.lane.value]
            for tenant, waiting in state.waiting_by_tenant:
                by_tenant.add_metric([*labels, tenant], waiting)
            jobs.add_metric([*labels, "waiting"], state.waiting)
            jobs.add_metric([*labels, "delivered"], state.delivered)
            jobs.add_metric([*labels, "delayed"], state.delayed)
            age.add_metric(labels, state.oldest_age_s)
        workers = GaugeMetricFamily(
            "genq_pool_workers", "Worker processes vouched alive and ready in a pool.", labels=POOL
        )
        circuit = GaugeMetricFamily(
            "genq_circuit_open", "1 while a pool's circuit breaker keeps new jobs away from it.", labels=POOL
        )
        for pool in snapshot.pools:
            workers.add_metric([pool.model, pool.backend.value], pool.workers)
            circuit.add_metric([pool.model, pool.backend.value], 1 if pool.circuit_open else 0)
        dead = GaugeMetricFamily("genq_dead_letters", "Jobs in the dead-letter stream, waiting for replay or purge.")
        dead.add_metric([], snapshot.dead_letters)
        yield from (jobs, by_tenant, age, workers, circuit, dead)


@dataclass(frozen=True)
class _LaneCount:
    queue: QueueName
    partition: str | None
    length: int
    pending: int
    last_delivered: str

    @property
    def waiting(self) -> int:
        return max(0, self.length - self.pending)


def _by_tenant(counts: Iterable[_LaneCount]) -> tuple[tuple[str, int], ...]:
    waiting: dict[str, int] = {}
    for count in counts:
        tenant = partition_tenant(count.partition)
        waiting[tenant] = waiting.get(tenant, 0) + count.waiting
    return tuple(sorted(waiting.items()))


def _names(members: Iterable[Any]) -> list[str]:
    return sorted(_text(m) for m in members)


def _after(entry_id: str) -> str:
    """The smallest stream id after `entry_id` (XRANGE's exclusive `(` needs Redis 6.2)."""
    millis, _, sequence = entry_id.partition("-")
    return f"{millis}-{int(sequence or 0) + 1}"


def _ok(reply: Any, default: Any) -> Any:
    """A pipeline reply, or `default` where Redis answered an error (e.g. a stream not there yet)."""
    if isinstance(reply, redis.ResponseError):
        return default
    if isinstance(reply, Exception):
        raise reply
    return reply


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
