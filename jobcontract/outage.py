"""Waiting out a Redis outage, for work that is already under way.

A worker that cannot reach Redis to start, finish or re-enqueue a job it holds must not give the
job up: Redis restarting takes a second or two, and a job dropped then is lost (its stream entry
acked by a later call, its record never finished). A caller submitting new work is different:
it wants a clear error at once, so callers keep a patience of zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

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
