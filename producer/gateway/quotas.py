"""Per-key limits that hold across every gateway of a namespace, because they live in Redis.

- **Rate**: a moving window per key (the `limits` library's Redis storage), so a burst at a
  window's edge cannot double the rate; a refused request gets the seconds until the window has
  room again.
- **Unfinished work**: a sorted set per key of the jobs (or batches) it submitted that may not be
  finished. A slot is reserved atomically (one Lua call: count, then add) before a job is
  admitted, so concurrent requests on several gateways never overshoot. Nobody has to tell the
  set when a job finishes: only when the set is full does the gateway look up its members' states
  and drop the finished ones (and ids whose record never appeared or expired), so the cost is paid
  by the key that is at its bound, not by every request or every worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from limits import RateLimitItem
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.models import JobState
from jobcontract.protocol.gateway import QuotaReserve
from producer.batch.book import BatchStatus
from producer.gateway.errors import ApiError

# An id reserved this recently may still be on its way into Redis: a missing record is not yet "gone".
ADMISSION_GRACE_S = 30


class RateLimits:
    """Requests per window per key, on the gateway's own Redis connections (no second login)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        # The URI only picks the storage class; connections come from the pool, so no password is copied.
        pool: Any = client.connection_pool  # `limits` types its pass-through options as scalars
        storage = RedisStorage("async+redis://", implementation="redispy", connection_pool=pool, key_prefix=prefix)
        self.limiter = MovingWindowRateLimiter(storage)

    async def hit(self, name: str, rate: Collection[RateLimitItem]) -> float | None:
        """Count one request; None if it is within every window, else seconds until there is room."""
        for item in rate:
            if not await self.limiter.hit(item, name):
                stats = await self.limiter.get_window_stats(item, name)
                return max(1.0, math.ceil(stats.reset_time - time.time()))
        return None


class Allowance:
    """At most a bound of unfinished things (jobs or batches) per key.

    `record` names the Redis hash of an id, whose `field` holds its state; states in `finished`
    free the slot, and so does a record that is gone (expired, or never written)."""

    def __init__(
        self,
        client: aioredis.Redis,
        members: Callable[[str], str],
        record: Callable[[str], str],
        *,
        field: str,
        finished: Collection[str],
        ttl_s: int,
    ) -> None:
        self.client = client
        self.members = members
        self.record = record
        self.field = field
        self.finished = {state.encode() for state in finished}
        self.ttl_s = ttl_s

    async def reserve(self, name: str, item_id: str, bound: int) -> bool:
        reserve = QuotaReserve(self.members(name), item_id, bound, self.ttl_s)
        if await protocol.run_async(self.client, reserve):
            return True
        await self.prune(name)
        return await protocol.run_async(self.client, reserve)

    async def release(self, name: str, item_id: str) -> None:
        await self.client.zrem(self.members(name), item_id)

    async def prune(self, name: str) -> int:
        """Drop the ids that are finished or gone; how many were dropped."""
        key = self.members(name)
        entries = cast(list[tuple[bytes, float]], await self.client.zrange(key, 0, -1, withscores=True))
        if not entries:
            return 0
        now_s = int((await self.client.time())[0])
        pipe = self.client.pipeline(transaction=False)
        for item_id, _reserved in entries:
            pipe.hget(self.record(_text(item_id)), self.field)
        states = await pipe.execute()
        stale = [
            item_id
            for (item_id, reserved), state in zip(entries, states, strict=True)
            if state in self.finished or (state is None and reserved < now_s - ADMISSION_GRACE_S)
        ]
        if stale:
            await self.client.zrem(key, *stale)
        return len(stale)

    async def count(self, name: str) -> int:
        return int(await self.client.zcard(self.members(name)))


@dataclass(frozen=True)
class Quotas:
    rate: RateLimits
    jobs: Allowance
    batches: Allowance

    @classmethod
    def build(cls, client: aioredis.Redis, keys: Keys, *, ttl_s: int) -> Quotas:
        terminal_jobs = [state.value for state in JobState if state.terminal]
        terminal_batches = [status.value for status in BatchStatus if status.terminal]
        return cls(
            rate=RateLimits(client, keys.rate_limits),
            jobs=Allowance(client, keys.caller_jobs, keys.job, field="state", finished=terminal_jobs, ttl_s=ttl_s),
            batches=Allowance(
                client, keys.caller_batches, keys.batch, field="status", finished=terminal_batches, ttl_s=ttl_s
            ),
        )


def too_many(name: str, what: str, bound: int) -> ApiError:
    return ApiError(
        429,
        f"API key {name!r} has {bound} unfinished {what}, its limit; retry when some have finished (or cancel some)",
        "rate_limit_error",
        code=f"too_many_unfinished_{what}",
        headers={"Retry-After": "2"},
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
