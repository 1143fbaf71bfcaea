"""A dramatiq broker on Redis Streams consumer groups.

Why not dramatiq's own Redis broker: an idle consumer there polls with backoff (hundreds of ms
before an idle worker sees a job), and a killed worker's messages come back only through a
random "maintenance" pass after a heartbeat timeout measured on each host's clock (minutes).
Here a consumer blocks in XREADGROUP and wakes the moment a job is added; every delivered entry
sits in the group's pending list until acked; and a consumer's entries are handed back only
when its liveness key (a TTL kept fresh by its owner, timed by Redis alone) is gone. Actors and
middleware do not notice the difference: this is a dramatiq.Broker like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import dramatiq
import redis
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import BrokerConnectionError, QueueNotFound

from jobcontract.connection import MAX_BLOCK_MS, stream_reply
from jobcontract.jobs import FAIL_JOB_LUA
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.outage import OUTAGE_ERRORS, OutagePolicy, ride_out

log = logging.getLogger(__name__)

MESSAGE_FIELD = "m"
DELAY_QUEUE_BLOCK_MS = 100
REDELIVERIES_FIELD = "r"
# How often a consumer looks for entries pending on its name that it never received.
ORPHAN_CHECK_S = 10.0
# How soon an entry left pending (its job's next step could not be settled) is taken back.
LEFT_PENDING_RETRY_S = 1.0

# Hands entries back to their stream as new entries. XACK answers 1 only for an entry still
# pending, so when several janitors race for the same entry exactly one moves it. An entry handed
# back more than ARGV[2] times (a poison job that kills whoever runs it) goes to dead letters, and
# its job is finished as failed so nobody waits on it.
_MOVE_ENTRIES = (
    FAIL_JOB_LUA
    + """
local function move(stream, group, id, max_redeliveries, dead)
  local entries = redis.call('XRANGE', stream, id, id)
  local acked = redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
  if acked ~= 1 or #entries ~= 1 then return 0 end
  local fields = entries[1][2]
  local redeliveries = 0
  local message = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'r' then redeliveries = tonumber(fields[i + 1]) end
    if fields[i] == 'm' then message = fields[i + 1] end
  end
  if message == nil then return 0 end
  if redeliveries >= max_redeliveries then
    local reason = 'handed back ' .. redeliveries .. ' times after its worker died'
    local queue = string.match(stream, ':q:(.*)$') or stream
    redis.call('XADD', dead, '*', 'm', message, 'queue', queue, 'reason', reason)
    fail_job(stream, message, 'worker_died', reason)
    return 0
  end
  redis.call('XADD', stream, '*', 'm', message, 'r', tostring(redeliveries + 1))
  return 1
end
"""
)

REQUEUE_SCRIPT = (
    _MOVE_ENTRIES
    + """
local moved = 0
for i = 3, #ARGV do
  moved = moved + move(KEYS[1], ARGV[1], ARGV[i], tonumber(ARGV[2]), KEYS[2])
end
return moved
"""
)

RECLAIM_SCRIPT = (
    _MOVE_ENTRIES
    + """
-- KEYS: stream, the consumer's liveness key, dead letters. ARGV: group, max redeliveries, consumer.
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 500, ARGV[3])
local moved = 0
for _, entry in ipairs(pending) do
  moved = moved + move(KEYS[1], ARGV[1], entry[1], tonumber(ARGV[2]), KEYS[3])
end
if #pending < 500 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3]) end
return moved
"""
)


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
    ) -> None:
        super().__init__(middleware=middleware)
        self.client = client
        self.keys = keys
        self.consumer_name = consumer_name
        self.max_redeliveries = max_redeliveries
        # Workers re-enqueue jobs they hold (retries, reroutes, due delayed jobs): wait out an outage.
        self.outage_patience_s = outage_patience_s
        self.outage = OutagePolicy(outage_patience_s)  # its consumers' requeue and settle too
        self.queues: set[str] = set()
        self._requeue = client.register_script(REQUEUE_SCRIPT)
        self._reclaim = client.register_script(RECLAIM_SCRIPT)

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
        """Create the stream's group from id 0, so jobs added before any worker existed are seen."""
        stream = self.keys.stream(queue_name)
        try:
            self.client.sadd(self.keys.queues, queue_name)
            self.client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
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
        encoded = message.encode()

        def add() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(self.keys.queues, queue_name)  # a rerouted job's queue may be new to rescuers
            pipe.xadd(self.keys.stream(queue_name), {MESSAGE_FIELD: encoded, REDELIVERIES_FIELD: 0})
            pipe.execute()

        try:
            ride_out(add, self.outage_patience_s)
        except redis.RedisError as error:
            raise BrokerConnectionError(str(error)) from error
        self.emit_after("enqueue", message, delay)
        return message

    # -- consuming -------------------------------------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 1000) -> StreamsConsumer:
        if queue_name not in self.queues and queue_name not in self.delay_queues:
            raise QueueNotFound(queue_name)
        return StreamsConsumer(self, queue_name, prefetch=prefetch, timeout_ms=timeout)

    def requeue_entries(self, queue_name: str, entry_ids: Iterable[str]) -> int:
        ids = list(entry_ids)
        if not ids:
            return 0
        keys = [self.keys.stream(queue_name), self.keys.dead_letters]
        return int(self._requeue(keys=keys, args=[CONSUMER_GROUP, self.max_redeliveries + 1, *ids]))

    def reclaim_dead_consumers(self) -> int:
        """Hand back every entry held by a consumer nobody vouches for any more; returns how many.

        Safe to run from every worker at once: the script checks liveness and moves atomically.
        """
        moved = 0
        for raw in self.client.smembers(self.keys.queues):
            queue = raw.decode() if isinstance(raw, bytes) else str(raw)
            stream = self.keys.stream(queue)
            try:
                consumers = self.client.xinfo_consumers(stream, CONSUMER_GROUP)
            except redis.ResponseError:
                continue  # the stream or its group is gone
            for consumer in consumers:
                name = _text(consumer["name"])
                if name == self.consumer_name:
                    continue
                result = int(
                    self._reclaim(
                        keys=[stream, self.keys.alive(name), self.keys.dead_letters],
                        args=[CONSUMER_GROUP, self.max_redeliveries, name],
                    )
                )
                moved += max(result, 0)
        return moved

    # -- housekeeping for tests and tools ------------------------------------------------------------
    def flush(self, queue_name: str) -> None:
        for name in (queue_name, dq_name(queue_name)):
            self.client.delete(self.keys.stream(name))
            self.ensure_group(name)

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until the queue and its delay queue hold no entry (acked entries are deleted)."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        streams = [self.keys.stream(queue_name), self.keys.stream(dq_name(queue_name))]
        while any(self.client.xlen(s) for s in streams):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue_name!r} still has work after {timeout} ms")
            time.sleep(0.01)


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
        raw = fields.get(MESSAGE_FIELD.encode())
        try:
            message = dramatiq.Message.decode(raw or b"")
        except Exception as error:  # a malformed entry must not wedge the queue
            log.error("undecodable entry %s on %s moved to dead letters: %s", entry_id, self.stream, error)
            self._settle(entry_id, dead_reason=f"undecodable message: {error}", raw=raw or b"")
            return
        redeliveries = int(fields.get(REDELIVERIES_FIELD.encode(), b"0"))
        with self.lock:
            self.in_flight += 1
            self.held.add(entry_id)
        self.buffer.append(StreamMessage(message, entry_id, redeliveries))

    def _adopt_orphans(self) -> None:
        """Take entries pending on this consumer's name that it never received. A read whose reply was
        lost (Redis restarted after running it, or redis-py re-sent it) delivered them to this name,
        and while this process lives no janitor hands them to anyone else: without this they wait
        forever."""
        self.next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
        reply = self.client.xreadgroup(CONSUMER_GROUP, self.broker.consumer_name, {self.stream: "0"}, count=1000)
        for _stream, entries in stream_reply(reply):
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                with self.lock:
                    if entry_id in self.held:
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
            pipe = self.client.pipeline(transaction=True)
            if dead_reason is not None:
                pipe.xadd(self.broker.keys.dead_letters, {"m": raw, "queue": self.queue_name, "reason": dead_reason})
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
