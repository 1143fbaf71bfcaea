"""The one Redis-outage policy: how long work already under way waits out an outage, and how.

A worker that cannot reach Redis to start, finish or re-enqueue a job it holds must not give the
job up: Redis restarting takes a second or two, and a job dropped then is lost (its stream entry
acked by a later call, its record never finished). A caller submitting new work is different:
it wants a clear error at once, so callers use FAIL_AT_ONCE (patience zero).

Every place that waits out an outage uses an OutagePolicy built from GENQ_REDIS_OUTAGE_PATIENCE_S
(`GenqSettings.outage_policy`): the job store's worker calls, the broker's re-enqueue and its settling
of an entry (ack, delete, dead-letter), the rerouting middleware's reads, and a batch file run.

The HTTP gateway sits between: a failover (no master known for a second or two) would otherwise
fail every request under way, including ones whose job is already queued and only waited on, and
its callers would all retry at once. So its asyncio client rides out a short outage inside
redis-py's own retry (PatientRetry), for a bounded time well below any caller's timeout, then
answers 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

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


# The moment the current call's patience runs out, shared by the retries nested inside it
# (reconnecting inside a command's retry), so they do not each wait the whole patience.
_GIVE_UP_AT: ContextVar[list[float] | None] = ContextVar("genq_give_up_at", default=None)


class PatientRetry(AsyncRetry):
    """redis-py's asyncio Retry, bounded by time instead of a count: a call keeps retrying (with a
    backoff up to 0.5 s) until `patience_s` after its first failure, then the error is raised.
    Each retry reconnects (asking the sentinels again, see jobcontract.sentinel_connections), so
    a call under way when the master fails completes on the new one if it is named in time. As
    with the count it replaces, a command whose reply was lost may run twice: genq's scripts are
    safe to repeat (a job id is queued once, the first result wins)."""

    def __init__(self, patience_s: float) -> None:
        super().__init__(ExponentialBackoff(cap=0.5, base=0.05), retries=-1)
        self.patience_s = patience_s

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> T:
        give_up_at = _GIVE_UP_AT.get()
        token = None
        if give_up_at is None:
            give_up_at = []
            token = _GIVE_UP_AT.set(give_up_at)

        async def fail_within_patience(error: Exception, *failures: int) -> None:
            await fail(error, *failures)
            if not give_up_at:
                give_up_at.append(time.monotonic() + self.patience_s)
            if time.monotonic() >= give_up_at[0]:
                raise error

        try:
            return await super().call_with_retry(do, fail_within_patience, *args, **kwargs)
        finally:
            if token is not None:
                _GIVE_UP_AT.reset(token)
