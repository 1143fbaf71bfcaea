"""Waiting out a Redis outage, for work that is already under way.

A worker that cannot reach Redis to start, finish or re-enqueue a job it holds must not give the
job up: Redis restarting takes a second or two, and a job dropped then is lost (its stream entry
acked by a later call, its record never finished). A caller submitting new work is different:
it wants a clear error at once, so callers keep a patience of zero.

The HTTP gateway sits between: a failover (no master known for a second or two) would otherwise
fail every request under way, including ones whose job is already queued and only waited on, and
its callers would all retry at once. So its asyncio client rides out a short outage inside
redis-py's own retry (PatientRetry), for a bounded time well below any caller's timeout, then
answers 503 + Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

T = TypeVar("T")

# Connection refused, reset, timed out, or Redis still loading its AOF (BusyLoadingError is one).
# During a Sentinel failover: no master known yet (MasterNotFoundError, a ConnectionError), or a
# demoted master answering READONLY to a write (ReadOnlyError): the write never happened.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


def ride_out(call: Callable[[], T], patience_s: float) -> T:
    """Run `call`, retrying through an outage for up to `patience_s` (backoff up to 1 s); then the
    last error is raised. A call retried after its reply was lost may run twice: only use this for
    calls that are safe to repeat (the job scripts are: the first result wins, a start is a start)."""
    deadline = time.monotonic() + patience_s
    delay = 0.05
    while True:
        try:
            return call()
        except OUTAGE_ERRORS:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(1.0, delay * 2)


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
