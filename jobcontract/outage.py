"""The one Redis-outage policy: how long work already under way waits out an outage, and how.

A worker that cannot reach Redis to start, finish or re-enqueue a job it holds must not give the
job up: Redis restarting takes a second or two, and a job dropped then is lost (its stream entry
acked by a later call, its record never finished). A caller submitting new work is different:
it wants a clear error at once, so callers use FAIL_AT_ONCE (patience zero).

Every place that waits out an outage uses an OutagePolicy built from GENQ_REDIS_OUTAGE_PATIENCE_S
(`GenqSettings.outage_policy`): the job store's worker calls, the broker's re-enqueue and its settling
of an entry (ack, delete, dead-letter), the rerouting middleware's reads, and a batch file run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

T = TypeVar("T")
log = logging.getLogger(__name__)

# Connection refused, reset, timed out, or Redis still loading its AOF (BusyLoadingError is one).
# During a Sentinel failover: no master known yet (MasterNotFoundError, a ConnectionError), or a
# demoted master answering READONLY to a write (ReadOnlyError): the write never happened.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


@dataclass(frozen=True)
class OutagePolicy:
    """Retry a call through an outage for up to `patience_s`, backing off from `first_delay_s` to
    `max_delay_s`; then the last error is raised.

    The patience is counted from the outage's first error, and a failure after a call that ran
    longer than `quiet_s` (a long loop that was working) starts a new outage: a batch run that
    sits through two short outages an hour apart goes on, one outage of `patience_s` ends it.
    A call retried after its reply was lost may run twice: only use this for calls that are safe
    to repeat (the job scripts are: the first result wins, a start is a start)."""

    patience_s: float
    errors: tuple[type[Exception], ...] = OUTAGE_ERRORS
    first_delay_s: float = 0.05
    max_delay_s: float = 1.0
    quiet_s: float = 5.0

    def ride_out(self, call: Callable[[], T]) -> T:
        outage = _Outage(self)
        while True:
            began = time.monotonic()
            try:
                return call()
            except self.errors as error:
                delay = outage.next_delay(began, error)
                if delay is None:
                    raise
                time.sleep(delay)

    async def ride_out_async(self, call: Callable[[], Awaitable[T]]) -> T:
        outage = _Outage(self)
        while True:
            began = time.monotonic()
            try:
                return await call()
            except self.errors as error:
                delay = outage.next_delay(began, error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)


class _Outage:
    """One outage's clock and backoff, shared by the sync and async ride_out."""

    def __init__(self, policy: OutagePolicy) -> None:
        self.policy = policy
        self.deadline = 0.0
        self.delay = policy.first_delay_s
        self.last_error: float | None = None

    def next_delay(self, call_began: float, error: Exception) -> float | None:
        """How long to sleep before the next try, or None when the patience is spent."""
        now = time.monotonic()
        if self.last_error is None or now - call_began > self.policy.quiet_s:
            self.deadline = now + self.policy.patience_s
            self.delay = self.policy.first_delay_s
            if self.policy.patience_s > 0:
                log.warning("Redis unavailable (%s); waiting it out for up to %.0fs", error, self.policy.patience_s)
        self.last_error = now
        delay = self.delay
        if now + delay > self.deadline:
            return None
        self.delay = min(self.policy.max_delay_s, self.delay * 2)
        return delay


FAIL_AT_ONCE = OutagePolicy(0.0)


def ride_out(call: Callable[[], T], patience_s: float) -> T:
    """OutagePolicy(patience_s).ride_out(call), for call sites that hold only a patience."""
    return OutagePolicy(patience_s).ride_out(call)
