"""The Python client for asyncio callers: the same surface as Client, awaiting instead of blocking.

Jobs go through AsyncJobStore (redis.asyncio), so thousands of waits share one event loop. A batch
file run is mostly file reading and writing, so `batch` runs the sync runner in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from jobcontract.jobs import IdempotencyConflict, QueueFull, UnknownJob
from jobcontract.jobs_async import AsyncJobStore, connect_async
from jobcontract.models import GenerationResult, JobState, JobStatus
from jobcontract.settings import GenqSettings
from producer.batch.book import BatchRecord
from producer.client import Client
from producer.client_base import ClientBase, GenqUnavailable, RequestLike

__all__ = ["AsyncClient", "GenqUnavailable", "IdempotencyConflict", "QueueFull", "UnknownJob"]


class AsyncClient(ClientBase):
    def __init__(self, settings: GenqSettings | None = None) -> None:
        super().__init__(settings)
        self.redis = connect_async(self.settings.redis_url)
        self.store = AsyncJobStore(
            self.redis,
            self.keys,
            result_ttl_s=self.settings.result_ttl_s,
            max_queued=self.settings.max_queued_jobs,
        )
        self._sync: Client | None = None  # for batch files, made on first use

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()
        if self._sync is not None:
            self._sync.close()

    async def submit(self, request: RequestLike, *, job_id: str | None = None) -> str:
        return (await self.submit_many([request], job_ids=None if job_id is None else [job_id]))[0]

    async def submit_many(
        self, requests: Sequence[RequestLike], *, batch_id: str | None = None, job_ids: Sequence[str] | None = None
    ) -> list[str]:
        checked, how = self.admission(requests, batch_id, job_ids)
        async with self._reaching_redis():
            receipts = await self.store.submit_many(checked, **how)
        return [r.job_id for r in receipts]

    async def result(self, job_id: str, timeout: float | None = None) -> GenerationResult:
        async with self._reaching_redis():
            return await self.store.wait(job_id, timeout)

    async def results(self, job_ids: Sequence[str], timeout: float | None = None) -> list[GenerationResult]:
        async with self._reaching_redis():
            done = await self.store.wait_many(job_ids, timeout)
        return [done[j] for j in job_ids]

    async def generate(self, request: RequestLike, timeout: float | None = None) -> GenerationResult:
        return await self.result(await self.submit(request), timeout)

    async def stream(self, request: RequestLike, timeout: float | None = None) -> AsyncIterator[str]:
        checked = self.validate(request)
        job_id = await self.submit(checked.model_copy(update={"stream": True}))
        async with self._reaching_redis():
            async for event in self.store.tokens(job_id, timeout):
                yield event.text

    async def status(self, job_id: str) -> JobStatus:
        async with self._reaching_redis():
            return await self.store.status(job_id)

    async def cancel(self, job_id: str) -> JobState:
        async with self._reaching_redis():
            return await self.store.cancel(job_id)

    # -- batches ---------------------------------------------------------------------------------------
    async def batch(
        self,
        input_path: str | Path,
        output_path: str | Path,
        *,
        errors_path: str | Path | None = None,
        skip_invalid: bool = False,
        batch_id: str | None = None,
        max_in_flight: int = 1000,
        on_progress: Callable[[Any], None] | None = None,
        on_start: Callable[[str, Any], None] | None = None,
    ) -> BatchRecord:
        """As Client.batch; `on_progress` and `on_start` are called from the runner's thread."""
        sync = self._sync_client()
        return await asyncio.to_thread(
            sync.batch,
            input_path,
            output_path,
            errors_path=errors_path,
            skip_invalid=skip_invalid,
            batch_id=batch_id,
            max_in_flight=max_in_flight,
            on_progress=on_progress,
            on_start=on_start,
        )

    async def batch_status(self, batch_id: str) -> BatchRecord:
        return await asyncio.to_thread(self._sync_client().batch_status, batch_id)

    async def batch_cancel(self, batch_id: str) -> BatchRecord:
        return await asyncio.to_thread(self._sync_client().batch_cancel, batch_id)

    def _sync_client(self) -> Client:
        if self._sync is None:
            self._sync = Client(self.settings)
        return self._sync
