"""State changes of queue entries: hand back (requeue), reclaim a dead consumer's, reject one into
dead letters, move to another queue (rescue), and replay a dead letter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import CONSUMER_GROUP, DEFAULT_TENANT, PARTITION_INFIX, Keys
from jobcontract.protocol.entry import DEFAULT_CAP, DeadLetterCap
from jobcontract.protocol.operation import Operation, text


@dataclass(frozen=True)
class Requeue(Operation[int]):
    """Hand entries back to their stream (the queue's, or its `partition`) as new entries (a
    poison one goes to dead letters, its job failed); answers how many went back."""

    SCRIPT: ClassVar[str] = "requeue.lua"

    names: Keys
    queue: str
    entry_ids: Sequence[str]
    max_redeliveries: int
    cap: DeadLetterCap = DEFAULT_CAP
    partition: str | None = None

    def keys(self) -> list[str]:
        return [self.names.partition(self.queue, self.partition), self.names.dead_letters]

    def args(self) -> list[Any]:
        return [CONSUMER_GROUP, self.max_redeliveries, *self.cap.args(), self.queue, *self.entry_ids]

    def parse(self, reply: Any) -> int:
        return int(reply)


@dataclass(frozen=True)
class Reclaim(Operation[int | None]):
    """Hand back every entry pending on a consumer nobody vouches for in one stream of a queue (its
    own, or its `partition`); None while one does."""

    SCRIPT: ClassVar[str] = "reclaim.lua"

    names: Keys
    queue: str
    consumer: str
    max_redeliveries: int
    cap: DeadLetterCap = DEFAULT_CAP
    partition: str | None = None

    def keys(self) -> list[str]:
        return [
            self.names.partition(self.queue, self.partition),
            self.names.alive(self.consumer),
            self.names.dead_letters,
        ]

    def args(self) -> list[Any]:
        return [CONSUMER_GROUP, self.max_redeliveries, self.consumer, *self.cap.args(), self.queue]

    def parse(self, reply: Any) -> int | None:
        moved = int(reply)
        return None if moved < 0 else moved


@dataclass(frozen=True)
class DeadConsumers(Operation[list[tuple[str, str | None, str]]]):
    """Every consumer of a queue's streams nobody vouches for, but `asker`: (queue, partition, consumer),
    each one a Reclaim to run (dead_consumers.lua)."""

    SCRIPT: ClassVar[str] = "dead_consumers.lua"

    names: Keys
    asker: str

    def keys(self) -> list[str]:
        return [self.names.queues]

    def args(self) -> list[Any]:
        stream = self.names.stream("")
        suffix = self.names.partitions("")[len(stream) :]
        bell = self.names.bell("")[len(stream) :]
        return [CONSUMER_GROUP, self.asker, stream, suffix, PARTITION_INFIX, self.names.alive(""), bell]

    def parse(self, reply: Any) -> list[tuple[str, str | None, str]]:
        return [(text(queue), text(member) or None, text(name)) for queue, member, name in reply or []]


@dataclass(frozen=True)
class Reject(Operation[None]):
    """Settle an entry a consumer gives up (undecodable, or its job given up by the rerouting
    middleware): file it under dead letters, trimmed to their cap, then ack and delete it."""

    SCRIPT: ClassVar[str] = "reject.lua"

    names: Keys
    queue: str
    entry_id: str
    message: bytes
    reason: str
    cap: DeadLetterCap = DEFAULT_CAP
    partition: str | None = None  # the partition of the queue the entry was in (Keys.partition)

    def keys(self) -> list[str]:
        return [self.names.partition(self.queue, self.partition), self.names.dead_letters]

    def args(self) -> list[Any]:
        return [CONSUMER_GROUP, self.entry_id, self.message, self.queue, self.reason, *self.cap.args()]

    def parse(self, reply: Any) -> None:
        return None


@dataclass(frozen=True)
class RescueMove(Operation[bool]):
    """Move one entry pending on the rescuer to another queue, unless a janitor took it back meanwhile."""

    SCRIPT: ClassVar[str] = "rescue_move.lua"

    names: Keys
    source: str
    destination: str
    entry_id: str
    message: bytes  # the message addressed to `destination`
    partition: str | None = None  # its partition: it moves to the same partition of the destination

    def keys(self) -> list[str]:
        source, destination = (
            self.names.partition(self.source, self.partition),
            self.names.partition(self.destination, self.partition),
        )
        return [source, destination, self.names.partitions(self.destination)]

    def args(self) -> list[Any]:
        return [CONSUMER_GROUP, self.entry_id, self.message, partition_arg(self.partition)]

    def parse(self, reply: Any) -> bool:
        return bool(int(reply))


@dataclass(frozen=True)
class ReplayOutcome:
    outcome: str  # 'replayed', 'gone' (no such dead letter any more) or 'refused'
    previous_state: str


@dataclass(frozen=True)
class Replay(Operation[ReplayOutcome]):
    """Put a dead letter's job back to queued with a fresh deadline (see jobcontract.deadletters)."""

    SCRIPT: ClassVar[str] = "replay.lua"

    names: Keys
    entry_id: str
    job_id: str
    message: bytes
    model: str
    lane: str
    queue: str
    timeout_us: int
    ttl_s: int
    batch_id: str | None
    partition: str | None = None  # the job's partition (its tenant and prefix shard): it goes back there

    def keys(self) -> list[str]:
        job = self.names.job(self.job_id)
        return [
            self.names.dead_letters,
            job,
            self.names.events(self.job_id),
            self.names.partition(self.queue, self.partition),
            self.names.queues,
            self.names.batch(self.batch_id) if self.batch_id else job,
            self.names.partitions(self.queue),
        ]

    def args(self) -> list[Any]:
        return [
            self.entry_id,
            self.message,
            self.model,
            self.lane,
            self.queue,
            self.timeout_us,
            self.ttl_s,
            "1" if self.batch_id else "0",
            partition_arg(self.partition),
        ]

    def parse(self, reply: Any) -> ReplayOutcome:
        outcome, state = (text(v) for v in reply)
        return ReplayOutcome(outcome, state)


def partition_arg(partition: str | None) -> str:
    """A partition as the scripts that register partitions take it: '' for the queue's own stream."""
    return "" if not partition or partition == DEFAULT_TENANT else partition


@dataclass(frozen=True)
class Enqueue(Operation[str]):
    """Add a message to a partition of a queue (see enqueue.lua); answers the entry id."""

    SCRIPT: ClassVar[str] = "enqueue.lua"

    names: Keys
    queue: str
    message: bytes
    partition: str | None = None

    def keys(self) -> list[str]:
        return [self.names.queues, self.names.partition(self.queue, self.partition), self.names.partitions(self.queue)]

    def args(self) -> list[Any]:
        return [self.queue, self.message, partition_arg(self.partition)]

    def parse(self, reply: Any) -> str:
        return text(reply)
