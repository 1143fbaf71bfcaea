"""The consuming side of jobcontract.broker: one queue read for one worker process.

A queue is several streams (partitions): its own, and one per tenant or tenant and prefix shard. What to
take next is the scheduler's (jobcontract.scheduling: a plan, then the Take operation in Redis);
the consumer blocks on every partition only when the take found nothing. Delivered entries stay pending
in their partition's group until settled (acked and deleted, or filed under dead letters), handed back
(Requeue) or left pending for the orphan check; see the broker's docstring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import dramatiq
import redis
from dramatiq.errors import BrokerConnectionError

from jobcontract import protocol
from jobcontract.connection import MAX_BLOCK_MS, stream_reply
from jobcontract.idle_read import IdleReader
from jobcontract.keys import CONSUMER_GROUP, PARTITION_INFIX, SHARD_MARK
from jobcontract.outage import OUTAGE_ERRORS
from jobcontract.protocol.entry import QueueEntry
from jobcontract.protocol.queue import Reject
from jobcontract.protocol.take import Take

if TYPE_CHECKING:
    from jobcontract.broker import StreamsBroker

log = logging.getLogger(__name__)

# A delay queue's consumer holding a delayed message wakes when its eta is due, and at least this often.
DELAY_QUEUE_MIN_BLOCK_MS = 10
# Prefix-shard partitions a consumer remembers taking from: about what a server's prompt cache holds.
WARM_PARTITIONS = 8
# How long a consumer whose plan has only age-bounded tiers (nothing to block on) sleeps between takes.
POLL_MS = 250
# How often a consumer whose plan forbids blocking reads (its model is not loaded in this process)
# looks again: a job for it waits for a load of seconds anyway.
UNBLOCKED_POLL_MS = 1000
# How often a consumer holding jobs its gate keeps back (their model is loading) looks again.
GATE_POLL_MS = 50
# How often a consumer looks for entries pending on its name that it never received.
ORPHAN_CHECK_S = 10.0
# ... and while it took nothing since the last look: a lost reply (the one way to make an orphan)
# of its idle reader's connection brings the look forward at once (IdleReader reconnects).
IDLE_ORPHAN_CHECK_S = 60.0
# An idle consumer (holding nothing, every partition of its plan read at once, nothing held back by an
# age bound) waits this long in one read: new partitions ring their queue's bell (entry.lua), a
# stopping worker ends the read (CLIENT UNBLOCK), and anything added to what it reads wakes it.
IDLE_BLOCK_MS = 10_000
# An idle consumer reads again without asking the scheduler first (the take would find the same
# nothing and the same partitions) for this long; then it asks again, in case of anything missed.
IDLE_RETAKE_S = 60.0
# Takes in a row a consumer answers bells with before it returns empty-handed; and how many rings
# it acks at once.
BELL_ROUNDS = 3
BELL_DRAIN = 100
# How soon an entry left pending (its job's next step could not be settled) is taken back.
LEFT_PENDING_RETRY_S = 1.0


class LeavePending(Exception):
    """Stuffed into a processed message by middleware that could not settle the job's fate (its next
    step could not be decided or queued): the consumer neither acks nor requeues the entry, which
    needs no Redis. It stays pending on this consumer's name and comes back through `_adopt_orphans`
    while this process lives, or through a janitor's reclaim once it is gone."""


class StreamMessage(dramatiq.MessageProxy):
    """A delivered message and the stream entry it came from (its partition and id), which is what gets
    acked; `partition` names it (None: the queue's own stream; see jobcontract.keys.partition_of)."""

    def __init__(
        self,
        message: dramatiq.Message[Any],
        entry_id: str,
        redeliveries: int,
        *,
        stream: str = "",
        partition: str | None = None,
    ) -> None:
        super().__init__(message)
        self.entry_id = entry_id
        self.redeliveries = redeliveries
        self.stream = stream
        self.partition = partition


class StreamsConsumer(dramatiq.Consumer):
    """Reads one queue (all its partitions) for one worker process, holding at most `prefetch` unacked entries.

    dramatiq acks from worker threads, so the in-flight count is guarded by a lock and a freed
    slot wakes a consumer that was waiting for room. `held` names the entries taken and not yet
    settled (by partition and id), so entries pending on this consumer's name that it never received can
    be told apart. A delay queue's consumer remembers the etas of what it holds, so it sleeps until
    the next one is due (dramatiq releases a delayed message only when a read returns) rather than
    polling.
    """

    def __init__(self, broker: StreamsBroker, queue_name: str, *, prefetch: int, timeout_ms: int) -> None:
        self.broker = broker
        self.client = broker.client
        self.queue_name = queue_name
        self.stream = broker.keys.stream(queue_name)
        self.prefetch = max(1, prefetch)
        self.timeout_ms = min(timeout_ms, MAX_BLOCK_MS)
        self.delayed = queue_name.endswith(".DQ")
        self.etas: dict[tuple[str, str], int] = {}  # a delay queue's held entries -> eta (ms)
        self.buffer: deque[StreamMessage] = deque()
        self.in_flight = 0
        self.held: set[tuple[str, str]] = set()
        # Prefix-shard partitions taken from lately, newest last: the take reads them as this
        # worker's own, so a prefix it stole stays with it (its server's cache holds it now).
        self.warm: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        self.slot_freed = threading.Event()
        self.reconnect_delay = 0.0
        self.next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
        self.took_since_orphan_check = False
        self.bell = broker.keys.bell(queue_name)
        self.idle_reader = IdleReader(self.client, IDLE_BLOCK_MS, on_reconnect=self._look_for_orphans_soon)
        # The partitions an idle read waits on, and until when it may read again without a take first.
        self.idle_streams: list[str] = []
        self.idle_until = 0.0

    def __iter__(self) -> Iterator[dramatiq.MessageProxy | None]:  # type: ignore[override]
        return self

    def __next__(self) -> StreamMessage | None:
        if self.buffer:
            return self._hand_out()
        with self.lock:
            room = self.prefetch - self.in_flight
            if room <= 0:
                self.slot_freed.clear()
        if room <= 0:
            self.slot_freed.wait(self._block_ms() / 1000)
            return None
        for _ in range(BELL_ROUNDS):  # a bell is answered with a take at once, not an empty return
            if not self._round(room) or self.buffer:
                break
        return self._hand_out() if self.buffer else None

    def _round(self, room: int) -> bool:
        """One take (or, idle and nothing changed, none) and one blocking read into the buffer; True when
        the queue's bell rang (a partition was made: take again, it may be one to read)."""
        try:
            if time.monotonic() >= self.next_orphan_check:
                self._adopt_orphans()
            if self.idle_streams and room == self.prefetch and time.monotonic() < self.idle_until:
                reply = self._idle_read(self.idle_streams)  # nothing changed since the take found nothing
            else:
                reply = self._take_or_read(room)
            rung = False
            for stream, entries in stream_reply(reply):
                name = _text(stream)
                if name == self.bell:
                    rung = True
                    self._answer_bell([_text(entry_id) for entry_id, _ in entries])
                    continue
                for entry_id, fields in entries:
                    self._take(name, _text(entry_id), fields)
        except OUTAGE_ERRORS as error:  # before ResponseError: a demoted master's READONLY is one
            self.idle_streams = []
            self._ride_out_read(error)
            return False
        except redis.ResponseError as error:
            self.idle_streams = []
            if "NOGROUP" not in str(error):
                raise
            log.warning("a group of %s vanished (Redis restarted without persistence?); recreating", self.stream)
            self.broker.ensure_group(self.queue_name)  # the queue's own stream, every partition's, its bell
            return False
        if rung or self.buffer:
            self.idle_streams = []
        return rung

    def _answer_bell(self, entry_ids: list[str]) -> None:
        """Ack the ring read, and the rings nobody was waiting for (a new tenant's shards ring many
        times, one per idle reader to wake): one take answers them all."""
        leftover = stream_reply(
            self.client.xreadgroup(CONSUMER_GROUP, self.broker.consumer_name, {self.bell: ">"}, count=BELL_DRAIN)
        )
        entry_ids += [_text(entry_id) for _, entries in leftover for entry_id, _ in entries]
        self.client.xack(self.bell, CONSUMER_GROUP, *entry_ids)

    def _take_or_read(self, room: int) -> Any:
        """Take what the scheduler gives; when that is nothing, block on the partitions to read (and the
        queue's bell) until something comes. Returns the blocking read's reply (None: nothing read)."""
        self.idle_streams = []
        self.took_since_orphan_check = True  # a take or read whose reply is lost leaves orphans
        # One take at a time in a process: a plan reads what the process's other consumers hold
        # (which models it is committed to), so two consumers never both decide on a stale view.
        with self.broker.take_lock:
            plan = self.broker.planner(self.queue_name)
            take = Take(self.broker.keys, self.broker.consumer_name, room, plan, tuple(self.warm))
            taken = protocol.run(self.client, take)
            for entry in taken.entries:
                self._take(entry.stream, entry.entry_id, entry.fields)
        self.reconnect_delay = 0.0
        if self.buffer:
            return None
        # A job held back by an age bound (another worker's prefix shard, a model to swap in) is
        # looked at again when it comes of age, not a whole block later.
        block_ms = self._block_ms() if taken.wake_ms is None else max(1, min(self._block_ms(), taken.wake_ms))
        if not taken.streams:  # only age-bounded tiers: nothing to block on
            time.sleep(min(block_ms, POLL_MS) / 1000)
            return None
        if not plan.block:  # a blocking read would take whatever comes, past the plan: look again
            time.sleep(min(block_ms, UNBLOCKED_POLL_MS) / 1000)
            return None
        streams = [*taken.streams, self.bell]
        idle = (
            plan.may_idle
            and taken.hidden == 0
            and taken.wake_ms is None
            and room == self.prefetch
            and not self.broker.quieting.is_set()
        )
        if idle:
            self.idle_streams = streams
            self.idle_until = time.monotonic() + IDLE_RETAKE_S
            return self._idle_read(streams)
        # Nothing waits: block on every partition until something comes (one entry each at most).
        return self.client.xreadgroup(
            CONSUMER_GROUP,
            self.broker.consumer_name,
            {stream: ">" for stream in streams},
            count=1,
            block=block_ms,
        )

    def _idle_read(self, streams: list[str]) -> Any:
        """Wait long for anything on the partitions of an idle plan, or the bell; a stopping broker
        ends the wait (wake)."""
        if self.broker.quieting.is_set():
            self.idle_streams = []
            return None
        reply = self.idle_reader.xreadgroup(
            CONSUMER_GROUP,
            self.broker.consumer_name,
            {stream: ">" for stream in streams},
            count=1,
            block_ms=IDLE_BLOCK_MS,
        )
        self.reconnect_delay = 0.0
        return reply

    def wake(self) -> bool:
        """End an idle read under way (the worker stops); False when none was."""
        return self.idle_reader.unblock()

    def reading_idle(self) -> bool:
        return self.idle_reader.reading()

    def _hand_out(self) -> StreamMessage | None:
        """The next held message for a worker thread, unless the broker's gate keeps this queue's jobs
        back for now (a multi-model worker: their model is not loaded yet). They stay held meanwhile
        (counted, and settled or handed back as any), and this consumer takes no more."""
        if self.broker.gate(self.queue_name):
            return self.buffer.popleft()
        time.sleep(GATE_POLL_MS / 1000)
        return None

    def _block_ms(self) -> int:
        """How long a read may block: a delay queue's consumer wakes when the first message it holds
        is due, so a 50 ms retry backoff is not stretched to a whole block."""
        if not self.delayed:
            return self.timeout_ms
        with self.lock:
            first = min(self.etas.values(), default=None)
        if first is None:
            return self.timeout_ms
        due_in = first - int(time.time() * 1000)
        return max(DELAY_QUEUE_MIN_BLOCK_MS, min(self.timeout_ms, due_in))

    def partition_of_stream(self, stream: str) -> str | None:
        """The partition a stream of this queue is (None: the queue's own stream)."""
        prefix = self.stream + PARTITION_INFIX
        return stream[len(prefix) :] if stream.startswith(prefix) else None

    def _look_for_orphans_soon(self) -> None:
        """The idle reader reconnected: a read of the lost connection may have delivered entries."""
        self.next_orphan_check = 0.0

    def _ride_out_read(self, error: Exception) -> None:
        """Ride out a Redis restart or failover here rather than letting dramatiq restart the consumer."""
        self.reconnect_delay = min(1.0, max(0.05, self.reconnect_delay * 2))
        self.next_orphan_check = 0.0  # a read whose reply was lost may have delivered entries
        log.warning(
            "redis unreachable while reading %s (%s); retrying in %.2fs", self.stream, error, self.reconnect_delay
        )
        time.sleep(self.reconnect_delay)

    def _take(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        entry = QueueEntry.read(fields)
        raw = entry.message or b""
        partition = self.partition_of_stream(stream)
        try:
            message = dramatiq.Message.decode(raw)
        except Exception as error:  # a malformed entry must not wedge the queue
            log.error("undecodable entry %s on %s moved to dead letters: %s", entry_id, stream, error)
            self._settle(stream, partition, entry_id, dead_reason=f"undecodable message: {error}", raw=raw)
            return
        if partition is not None and SHARD_MARK in partition:
            self.warm[partition] = None
            self.warm.move_to_end(partition)
            while len(self.warm) > WARM_PARTITIONS:
                self.warm.popitem(last=False)
        with self.lock:
            self.in_flight += 1
            self.held.add((stream, entry_id))
            if self.delayed:
                self.etas[(stream, entry_id)] = int(message.options.get("eta", 0))
        self.buffer.append(StreamMessage(message, entry_id, entry.redeliveries, stream=stream, partition=partition))

    def _adopt_orphans(self) -> None:
        """Take entries pending on this consumer's name that it never received. A read whose reply was
        lost (Redis restarted after running it, or redis-py re-sent it) delivered them to this name,
        and while this process lives no janitor hands them to anyone else: without this they wait
        forever.

        What this consumer held when the read began is not an orphan even if it is no longer held:
        a worker thread may ack it between the reply and this look (it was pending when read), and
        taking it then would start a job that has just finished. Only this thread receives entries,
        so nothing is received between the snapshot and the read."""
        with self.lock:
            held_at_read = set(self.held)
        busy = self.took_since_orphan_check or bool(held_at_read)
        self.next_orphan_check = time.monotonic() + (ORPHAN_CHECK_S if busy else IDLE_ORPHAN_CHECK_S)
        self.took_since_orphan_check = False
        streams = self.broker.partition_streams(self.queue_name)
        reply = self.client.xreadgroup(
            CONSUMER_GROUP, self.broker.consumer_name, {stream: "0" for stream in streams}, count=1000
        )
        for raw_stream, entries in stream_reply(reply):
            stream = _text(raw_stream)
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                with self.lock:
                    if (stream, entry_id) in self.held or (stream, entry_id) in held_at_read:
                        continue
                if not fields:  # deleted while pending: nothing is left to run
                    self.client.xack(stream, CONSUMER_GROUP, entry_id)
                    continue
                log.warning("entry %s of %s was delivered here but never received; taking it", entry_id, stream)
                self._take(stream, entry_id, fields)

    def ack(self, message: dramatiq.MessageProxy) -> None:
        if isinstance(getattr(message, "_exception", None), LeavePending):
            self._leave_pending(_held(message))
            return
        if isinstance(getattr(message, "_exception", None), OUTAGE_ERRORS):
            # The run broke off because Redis was away, not because of the job: it runs again.
            self.requeue([message])
            return
        delivered = _held(message)
        self._settle(delivered.stream, delivered.partition, delivered.entry_id)
        self._release(delivered)

    def nack(self, message: dramatiq.MessageProxy) -> None:
        exception = getattr(message, "_exception", None)
        reason = repr(exception) if exception is not None else "rejected"
        delivered = _held(message)
        self._settle(
            delivered.stream, delivered.partition, delivered.entry_id, dead_reason=reason, raw=message._message.encode()
        )
        self._release(delivered)

    def requeue(self, messages: Iterable[dramatiq.MessageProxy]) -> None:
        by_partition: dict[str | None, list[StreamMessage]] = {}
        for message in messages:
            delivered = _held(message)
            by_partition.setdefault(delivered.partition, []).append(delivered)
        for partition, held in by_partition.items():
            ids = [m.entry_id for m in held]

            def hand_back(ids: list[str] = ids, partition: str | None = partition) -> None:
                self.broker.requeue_entries(self.queue_name, ids, partition=partition)

            try:
                self.broker.outage.ride_out(hand_back)
            except OUTAGE_ERRORS as error:  # dramatiq retries a BrokerConnectionError until Redis is back
                raise BrokerConnectionError(str(error)) from error
            for delivered in held:
                self._release(delivered)

    def close(self) -> None:
        if self.buffer:
            self.requeue(list(self.buffer))
            self.buffer.clear()
        self.idle_reader.close()

    def _leave_pending(self, delivered: StreamMessage) -> None:
        """Forget the entry here without touching Redis, and look for it again soon: an entry pending
        on this name that this consumer does not hold is what the orphan check takes back."""
        log.warning("entry %s of %s left pending; it will be delivered again", delivered.entry_id, delivered.stream)
        self._release(delivered)
        self.next_orphan_check = min(self.next_orphan_check, time.monotonic() + LEFT_PENDING_RETRY_S)

    def _release(self, delivered: StreamMessage) -> None:
        """Called only once the entry is settled in Redis, so it never looks orphaned in between."""
        held = (delivered.stream, delivered.entry_id)
        with self.lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.held.discard(held)
            self.etas.pop(held, None)
        self.slot_freed.set()

    def _settle(
        self, stream: str, partition: str | None, entry_id: str, *, dead_reason: str | None = None, raw: bytes = b""
    ) -> None:
        """Ack and delete an entry (and file it under dead letters when rejected), retrying through
        a short Redis outage so a finished job is not handed to someone else for nothing."""

        def settle() -> None:
            if dead_reason is not None:
                keys, cap = self.broker.keys, self.broker.dead_letter_cap
                reject = Reject(keys, self.queue_name, entry_id, raw, dead_reason, cap, partition=partition)
                protocol.run(self.client, reject)
                return
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            pipe.execute()

        try:
            self.broker.outage.ride_out(settle)
        except OUTAGE_ERRORS as error:
            raise BrokerConnectionError(str(error)) from error


def _held(message: dramatiq.MessageProxy) -> StreamMessage:
    assert isinstance(message, StreamMessage), "a StreamsConsumer only settles its own messages"
    return message


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
