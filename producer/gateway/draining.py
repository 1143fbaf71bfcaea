"""Stopping the gateway within a bounded time (`GENQ_GATEWAY_SHUTDOWN_GRACE_S`).

On SIGTERM uvicorn stops accepting, then waits for every open request to end on its own. A
long-poll (`.../result?wait=60`), a blocking completion (up to `timeout_s + 5`) or a stream ends
only when its job does, long after compose's `stop_grace_period`: Docker then SIGKILLs the
gateway, callers see connection resets and the jobs of cut streams run on for nobody.

So the shutdown first drains the waiters: a long-poll or a blocking completion answers 503 with
`Retry-After` (OpenAI's error shape, so SDKs retry it, against another gateway), a stream sends an
error event and cancels its job, as a caller's hang-up does. Every other request gets the grace
to finish; then uvicorn cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from producer.gateway.errors import ApiError

T = TypeVar("T")
RETRY_AFTER_S = 1


class ShuttingDown(ApiError):
    def __init__(self, job_id: str | None = None) -> None:
        where = f"; job {job_id} goes on: fetch it at /v1/genq/jobs/{job_id}/result" if job_id else ""
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if job_id:
            headers["X-Genq-Job-Id"] = job_id
        super().__init__(
            503,
            f"the gateway is shutting down; retry{where}",
            "service_unavailable",
            code="shutting_down",
            headers=headers,
        )


class Drain:
    """Set once, when the server begins to stop; waiters race their wait against it."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    @property
    def started(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._stopping.set()

    async def race(self, awaitable: Awaitable[T], *, job_id: str | None = None) -> T:
        """The awaitable's value, or ShuttingDown as soon as the drain starts (the wait is cancelled)."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            return await self._race(awaitable, stop, job_id)
        finally:
            stop.cancel()

    async def iterate(self, source: AsyncIterator[T], *, job_id: str | None = None) -> AsyncIterator[T]:
        """The items of `source` until it ends, or ShuttingDown when the drain starts."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                try:
                    item = await self._race(_next(source), stop, job_id)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            stop.cancel()
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _race(self, awaitable: Awaitable[T], stop: asyncio.Future[Any], job_id: str | None) -> T:
        if self.started:
            _discard(awaitable)
            raise ShuttingDown(job_id)
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            raise ShuttingDown(job_id)
        return work.result()


async def _next(source: AsyncIterator[T]) -> T:
    return await source.__anext__()


def _discard(awaitable: Awaitable[Any]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never awaited would warn
