"""The consuming side of jobcontract.broker: one queue read for one worker process.

Delivered entries stay pending in the group until settled (acked and deleted, or filed under dead
letters), handed back (Requeue) or left pending for the orphan check; see the broker's docstring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import dramatiq
import redis
from dramatiq.errors import BrokerConnectionError

from jobcontract import protocol
from jobcontract.connection import MAX_BLOCK_MS, stream_reply
from jobcontract.keys import CONSUMER_GROUP
from jobcontract.outage import OUTAGE_ERRORS
from jobcontract.protocol.entry import QueueEntry
from jobcontract.protocol.queue import Reject

if TYPE_CHECKING:
    from jobcontract.broker import StreamsBroker

log = logging.getLogger(__name__)

DELAY_QUEUE_BLOCK_MS = 100
# How often a consumer looks for entries pending on its name that it never received.
ORPHAN_CHECK_S = 10.0
# How soon an entry left pending (its job's next step could not be settled) is taken back.
LEFT_PENDING_RETRY_S = 1.0


class LeavePending(Exception):
    """Stuffed into a processed message by middleware that could not settle the job's fate (its next
    step could not be decided or queued): the consumer neither acks nor requeues the entry, which
    needs no Redis. It stays pending on this consumer's name and comes back through `_adopt_orphans`
    while this process lives, or through a janitor's reclaim once it is gone."""


class StreamMessage(dramatiq.MessageProxy):
    """A delivered message and the stream entry it came from, which is what gets acked."""

    def __init__(self, message: dramatiq.Message[Any], entry_id: str, redeliveries: int) -> None:
        super().__init__(message)
        self.entry_id = entry_id
        self.redeliveries = redeliveries


class StreamsConsumer(dramatiq.Consumer):
    """Reads one queue for one worker process, holding at most `prefetch` unacked entries.

    dramatiq acks from worker threads, so the in-flight count is guarded by a lock and a freed
    slot wakes a consumer that was waiting for room. `held` names the entries taken and not yet
    settled, so entries pending on this consumer's name that it never received can be told apart.
    """

    def __init__(self, broker: StreamsBroker, queue_name: str, *, prefetch: int, timeout_ms: int) -> None:
        self.broker = broker
        self.client = broker.client
        self.queue_name = queue_name
        self.stream = broker.keys.stream(queue_name)
        self.prefetch = max(1, prefetch)
        # A delay queue's consumer must come back often: dramatiq releases a delayed message (a
        # retry's backoff) only when the read returns, so a long block would stretch a 50 ms backoff to a second.
        self.timeout_ms = min(timeout_ms, DELAY_QUEUE_BLOCK_MS if queue_name.endswith(".DQ") else MAX_BLOCK_MS)
        self.buffer: deque[StreamMessage] = deque()
        self.in_flight = 0
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.slot_freed = threading.Event()
        self.reconnect_delay = 0.0
        self.next_orphan_check = time.monotonic() + ORPHAN_CHECK_S

    def __iter__(self) -> Iterator[dramatiq.MessageProxy | None]:  # type: ignore[override]
        return self

    def __next__(self) -> StreamMessage | None:
        if self.buffer:
            return self.buffer.popleft()
        with self.lock:
            room = self.prefetch - self.in_flight
            if room <= 0:
                self.slot_freed.clear()
        if room <= 0:
            self.slot_freed.wait(self.timeout_ms / 1000)
            return None
        try:
            if time.monotonic() >= self.next_orphan_check:
                self._adopt_orphans()
            reply = self.client.xreadgroup(
                CONSUMER_GROUP,
                self.broker.consumer_name,
                {self.stream: ">"},
                count=room,
                block=self.timeout_ms,
            )
            self.reconnect_delay = 0.0
        except OUTAGE_ERRORS as error:  # before ResponseError: a demoted master's READONLY is one
            self._ride_out_read(error)
            return None
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning("group for %s vanished (Redis restarted without persistence?); recreating", self.stream)
            self.broker.ensure_group(self.queue_name)
            return None
        for _stream, entries in stream_reply(reply):
            for entry_id, fields in entries:
                self._take(_text(entry_id), fields)
        return self.buffer.popleft() if self.buffer else None

    def _ride_out_read(self, error: Exception) -> None:
        """Ride out a Redis restart or failover here rather than letting dramatiq restart the consumer."""
        self.reconnect_delay = min(1.0, max(0.05, self.reconnect_delay * 2))
        self.next_orphan_check = 0.0  # a read whose reply was lost may have delivered entries
        log.warning(
            "redis unreachable while reading %s (%s); retrying in %.2fs", self.stream, error, self.reconnect_delay
        )
        time.sleep(self.reconnect_delay)

    def _take(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        entry = QueueEntry.read(fields)
        raw = entry.message or b""
        try:
            message = dramatiq.Message.decode(raw)
        except Exception as error:  # a malformed entry must not wedge the queue
            log.error("undecodable entry %s on %s moved to dead letters: %s", entry_id, self.stream, error)
            self._settle(entry_id, dead_reason=f"undecodable message: {error}", raw=raw)
            return
        redeliveries = entry.redeliveries
        with self.lock:
            self.in_flight += 1
            self.held.add(entry_id)
        self.buffer.append(StreamMessage(message, entry_id, redeliveries))

    def _adopt_orphans(self) -> None:
        """Take entries pending on this consumer's name that it never received. A read whose reply was
        lost (Redis restarted after running it, or redis-py re-sent it) delivered them to this name,
        and while this process lives no janitor hands them to anyone else: without this they wait
        forever.

        What this consumer held when the read began is not an orphan even if it is no longer held:
        a worker thread may ack it between the reply and this look (it was pending when read), and
        taking it then would start a job that has just finished. Only this thread receives entries,
        so nothing is received between the snapshot and the read."""
        self.next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
        with self.lock:
            held_at_read = set(self.held)
        reply = self.client.xreadgroup(CONSUMER_GROUP, self.broker.consumer_name, {self.stream: "0"}, count=1000)
        for _stream, entries in stream_reply(reply):
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                with self.lock:
                    if entry_id in self.held or entry_id in held_at_read:
                        continue
                if not fields:  # deleted while pending: nothing is left to run
                    self.client.xack(self.stream, CONSUMER_GROUP, entry_id)
                    continue
                log.warning("entry %s of %s was delivered here but never received; taking it", entry_id, self.stream)
                self._take(entry_id, fields)

    def ack(self, message: dramatiq.MessageProxy) -> None:
        if isinstance(getattr(message, "_exception", None), LeavePending):
            self._leave_pending(_entry_id(message))
            return
        if isinstance(getattr(message, "_exception", None), OUTAGE_ERRORS):
            # The run broke off because Redis was away, not because of the job: it runs again.
            self.requeue([message])
            return
        self._settle(_entry_id(message))
        self._release(_entry_id(message))

    def nack(self, message: dramatiq.MessageProxy) -> None:
        exception = getattr(message, "_exception", None)
        reason = repr(exception) if exception is not None else "rejected"
        self._settle(_entry_id(message), dead_reason=reason, raw=message._message.encode())
        self._release(_entry_id(message))

    def requeue(self, messages: Iterable[dramatiq.MessageProxy]) -> None:
        ids = [_entry_id(m) for m in messages]
        if ids:
            try:
                self.broker.outage.ride_out(lambda: self.broker.requeue_entries(self.queue_name, ids))
            except OUTAGE_ERRORS as error:  # dramatiq retries a BrokerConnectionError until Redis is back
                raise BrokerConnectionError(str(error)) from error
            for entry_id in ids:
                self._release(entry_id)

    def close(self) -> None:
        if self.buffer:
            self.requeue(list(self.buffer))
            self.buffer.clear()

    def _leave_pending(self, entry_id: str) -> None:
        """Forget the entry here without touching Redis, and look for it again soon: an entry pending
        on this name that this consumer does not hold is what the orphan check takes back."""
        log.warning("entry %s of %s left pending; it will be delivered again", entry_id, self.stream)
        self._release(entry_id)
        self.next_orphan_check = min(self.next_orphan_check, time.monotonic() + LEFT_PENDING_RETRY_S)

    def _release(self, entry_id: str) -> None:
        """Called only once the entry is settled in Redis, so it never looks orphaned in between."""
        with self.lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.held.discard(entry_id)
        self.slot_freed.set()

    def _settle(self, entry_id: str, *, dead_reason: str | None = None, raw: bytes = b"") -> None:
        """Ack and delete an entry (and file it under dead letters when rejected), retrying through
        a short Redis outage so a finished job is not handed to someone else for nothing."""

        def settle() -> None:
            if dead_reason is not None:
                keys, cap = self.broker.keys, self.broker.dead_letter_cap
                protocol.run(self.client, Reject(keys, self.queue_name, entry_id, raw, dead_reason, cap))
                return
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.execute()

        try:
            self.broker.outage.ride_out(settle)
        except OUTAGE_ERRORS as error:
            raise BrokerConnectionError(str(error)) from error


def _entry_id(message: dramatiq.MessageProxy) -> str:
    assert isinstance(message, StreamMessage), "a StreamsConsumer only settles its own messages"
    return message.entry_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
