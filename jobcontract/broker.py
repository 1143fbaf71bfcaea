"""A dramatiq broker on Redis Streams consumer groups.

Why not dramatiq's own Redis broker: an idle consumer there polls with backoff (hundreds of ms
before an idle worker sees a job), and a killed worker's messages come back only through a
random "maintenance" pass after a heartbeat timeout measured on each host's clock (minutes).
Here a consumer blocks in XREADGROUP and wakes the moment a job is added; every delivered entry
sits in the group's pending list until acked; and a consumer's entries are handed back only
when its liveness key (a TTL kept fresh by its owner, timed by Redis alone) is gone. Actors and
middleware do not notice the difference: this is a dramatiq.Broker like any other.

A queue is several streams ("partitions"): its own, which holds the default tenant's entries without a
prefix fingerprint, and one per tenant, or tenant and prefix shard, that submitted to it
(jobcontract.keys.partition_of), listed in the queue's partition set. Which partition
a consumer takes from next is the scheduler's (jobcontract.scheduling); everything else here works on
every partition of a queue alike.

Handing entries back (Requeue, Reclaim: a poison entry goes to dead letters and its job is failed)
are operations of jobcontract.protocol; the consumer is jobcontract.consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import dramatiq
import redis
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import BrokerConnectionError, QueueNotFound

from jobcontract import protocol
from jobcontract.consumer import LeavePending as LeavePending  # middleware and tests find these here
from jobcontract.consumer import StreamMessage as StreamMessage
from jobcontract.consumer import StreamsConsumer
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.outage import OutagePolicy
from jobcontract.protocol.entry import DeadLetterCap
from jobcontract.protocol.queue import DeadConsumers, Enqueue, Reclaim, Requeue
from jobcontract.scheduling import TakePlan, message_partition, plan

__all__ = ["LeavePending", "StreamMessage", "StreamsBroker", "StreamsConsumer"]

# How long a stopping broker keeps ending idle reads that began as it stopped.
QUIET_PATIENCE_S = 1.0


class StreamsBroker(dramatiq.Broker):
    """Queues are streams `{namespace}:q:{queue}` with one consumer group shared by all workers.

    `consumer_name` names this process in every group it reads; its owner must keep
    `keys.alive(consumer_name)` fresh (see workers.supervisor), or the janitor of any live
    worker hands its pending jobs to others.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        consumer_name: str = "producer",
        middleware: list[dramatiq.Middleware] | None = None,
        max_redeliveries: int = 5,
        outage_patience_s: float = 0.0,
        dead_letter_cap: DeadLetterCap | None = None,
        planner: Callable[[str], TakePlan] = plan,
    ) -> None:
        super().__init__(middleware=middleware)
        self.client = client
        self.keys = keys
        self.consumer_name = consumer_name
        self.max_redeliveries = max_redeliveries
        self.dead_letter_cap = dead_letter_cap or DeadLetterCap()  # every path filing one trims to it
        # Workers re-enqueue jobs they hold (retries, reroutes, due delayed jobs): wait out an outage.
        self.outage_patience_s = outage_patience_s
        self.outage = OutagePolicy(outage_patience_s)  # its consumers' requeue and settle too
        self.queues: set[str] = set()
        self.planner = planner  # queue -> where its consumer takes from next (jobcontract.scheduling)
        # queue -> whether the jobs its consumer holds may go to worker threads now. A multi-model worker
        # holds a model's jobs back until the model is loaded, so no thread waits on a load.
        self.gate: Callable[[str], bool] = _always
        self.take_lock = threading.Lock()  # one plan-and-take at a time in this process
        self.consumers: list[StreamsConsumer] = []
        self.quieting = threading.Event()  # the worker stops: no consumer starts a long idle read

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal == "worker_shutdown":  # dramatiq's Worker.stop: end the idle reads, or it waits them out
            self.quiet()
        super().emit_before(signal, *args, **kwargs)

    def quiet(self) -> None:
        """From now on consumers read as briefly as before idle reads existed, and the idle reads under
        way end at once (CLIENT UNBLOCK). Asked again for a moment: an unblock that reached Redis just
        before its read did would leave that read waiting its whole block."""
        self.quieting.set()
        deadline = time.monotonic() + QUIET_PATIENCE_S
        while True:
            waiting = [c for c in self.consumers if c.reading_idle()]
            if not waiting or time.monotonic() > deadline:
                return
            for consumer in waiting:
                try:
                    consumer.wake()
                except redis.RedisError:
                    return  # Redis away: the reads fail by themselves
            time.sleep(0.02)

    # -- declaring -------------------------------------------------------------------------------------
    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        self.queues.add(queue_name)
        self.ensure_group(queue_name)
        self.emit_after("declare_queue", queue_name)
        delayed = dq_name(queue_name)
        self.delay_queues.add(delayed)
        self.ensure_group(delayed)
        self.emit_after("declare_delay_queue", delayed)

    def ensure_group(self, queue_name: str) -> None:
        """Create the group of the queue's stream, of each partition in its partition set and of its bell,
        from id 0, so jobs added before any worker existed are seen (a partition's stream deleted while
        listed is made again, empty, rather than failing every blocking read on it)."""
        try:
            self.client.sadd(self.keys.queues, queue_name)
            for stream in [*self.partition_streams(queue_name), self.keys.bell(queue_name)]:
                try:
                    self.client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
                except redis.ResponseError as error:
                    if "BUSYGROUP" not in str(error):
                        raise
        except redis.ResponseError:
            raise
        except redis.RedisError as error:
            raise BrokerConnectionError(str(error)) from error

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    # -- producing -------------------------------------------------------------------------------------
    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        queue_name = message.queue_name
        if delay is not None:
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name, options={"eta": current_millis() + delay})
        self.emit_before("enqueue", message, delay)
        add = Enqueue(
            self.keys, queue_name, message.encode(), partition=message_partition(message.kwargs, message.options)
        )
        try:
            self.outage.ride_out(lambda: protocol.run(self.client, add))
        except redis.RedisError as error:
            raise BrokerConnectionError(str(error)) from error
        self.emit_after("enqueue", message, delay)
        return message

    # -- consuming -------------------------------------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 1000) -> StreamsConsumer:
        if queue_name not in self.queues and queue_name not in self.delay_queues:
            raise QueueNotFound(queue_name)
        consumer = StreamsConsumer(self, queue_name, prefetch=prefetch, timeout_ms=timeout)
        self.consumers.append(consumer)
        return consumer

    def held(self) -> dict[str, int]:
        """Queue -> entries this process's consumers hold (taken, not yet settled); delay queues not
        counted (a retry waiting out its backoff commits nobody to anything)."""
        return {c.queue_name: c.in_flight for c in self.consumers if not c.delayed}

    def requeue_entries(self, queue_name: str, entry_ids: Iterable[str], *, partition: str | None = None) -> int:
        """Hand entries of a partition of a queue back to it."""
        ids = list(entry_ids)
        if not ids:
            return 0
        requeue = Requeue(
            self.keys, queue_name, ids, self.max_redeliveries + 1, self.dead_letter_cap, partition=partition
        )
        return protocol.run(self.client, requeue)

    def partitions(self, queue_name: str) -> list[str | None]:
        """The partitions of a queue: None (the queue's own stream) first, then its partition set's members."""
        return [None, *sorted(_text(t) for t in self.client.smembers(self.keys.partitions(queue_name)))]

    def partition_streams(self, queue_name: str) -> list[str]:
        return [self.keys.partition(queue_name, member) for member in self.partitions(queue_name)]

    def reclaim_dead_consumers(self) -> int:
        """Hand back every entry held by a consumer nobody vouches for any more; returns how many.

        One call finds the dead consumers of every queue's partitions (DeadConsumers), then one Reclaim
        each: an idle fleet's janitors cost Redis one call a pass. Safe to run from every worker at
        once: the reclaim checks liveness again and moves atomically.
        """
        moved = 0
        for queue, partition, name in protocol.run(self.client, DeadConsumers(self.keys, self.consumer_name)):
            reclaim = Reclaim(self.keys, queue, name, self.max_redeliveries, self.dead_letter_cap, partition=partition)
            moved += protocol.run(self.client, reclaim) or 0
        return moved

    # -- housekeeping for tests and tools ------------------------------------------------------------
    def flush(self, queue_name: str) -> None:
        for name in (queue_name, dq_name(queue_name)):
            self.client.delete(
                *self.partition_streams(name),
                self.keys.partitions(name),
                self.keys.fair_tags(name),
                self.keys.bell(name),
            )
            self.ensure_group(name)

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until the queue and its delay queue hold no entry (acked entries are deleted)."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while any(self.client.xlen(s) for q in (queue_name, dq_name(queue_name)) for s in self.partition_streams(q)):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue_name!r} still has work after {timeout} ms")
            time.sleep(0.01)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _always(_queue: str) -> bool:
    return True
