"""The job store's caller side on `redis.asyncio`, for the HTTP gateway and the async client.

The operations (jobcontract.protocol: script, keys, arguments, reply) and the parsing of records are
the ones JobStore runs, used here as they are: only the waiting (XREAD) and the round trips are async.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, cast

import redis.asyncio as aioredis

from jobcontract.admission import Admission, Receipt
from jobcontract.connection import MAX_BLOCK_MS, stream_reply
from jobcontract.connection import connect_async as connect_async  # where the gateway and clients look
from jobcontract.durability import add_wait, admitted, durability_of
from jobcontract.jobs import (
    UnknownJob,
    cancelled_before_it_ran,
    new_job_id,
    parse_status,
)
from jobcontract.keys import Keys
from jobcontract.models import (
    GenerationRequest,
    GenerationResult,
    JobState,
    JobStatus,
    TokenEvent,
    utc_from_micros,
)
from jobcontract.protocol.jobs import Finish, Submit
from jobcontract.protocol.operation import run_async, send_async
from jobcontract.routes import ModelRoute


class AsyncJobStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, result_ttl_s: int, max_queued: int) -> None:
        self.client = client
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.max_queued = max_queued

    async def submit(
        self,
        request: GenerationRequest,
        route: ModelRoute,
        *,
        default_timeout_s: float,
        batch_id: str | None = None,
        job_id: str | None = None,
    ) -> Receipt:
        receipts = await self.submit_many(
            [request],
            route_for=lambda _: route,
            default_timeout_s=default_timeout_s,
            batch_id=batch_id,
            job_ids=[job_id or new_job_id()],
        )
        return receipts[0]

    async def submit_many(
        self,
        requests: Sequence[GenerationRequest],
        *,
        route_for: Callable[[str], ModelRoute],
        default_timeout_s: float,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[Receipt]:
        """As JobStore.submit_many: the whole list in one script, or none of it."""
        if not requests:
            return []
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in requests]
        admission = Admission(self.keys, self.max_queued, self.result_ttl_s, default_timeout_s)
        submit = Submit(admission, requests, ids, route_for, batch_id)
        if not durability_of(self.client).waits:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS
            return await run_async(self.client, submit)
        pipe = self.client.pipeline(transaction=False)
        await send_async(pipe, self.client, submit)
        durability = add_wait(pipe, self.client)
        return submit.parse(admitted(await pipe.execute(raise_on_error=True), durability, self.client))

    async def result(self, job_id: str) -> GenerationResult | None:
        raw = await self.client.hget(self.keys.job(job_id), "result")
        return None if raw is None else GenerationResult.model_validate_json(raw)

    async def wait(self, job_id: str, timeout_s: float | None) -> GenerationResult:
        return (await self.wait_many([job_id], timeout_s))[job_id]

    async def wait_many(self, job_ids: Iterable[str], timeout_s: float | None) -> dict[str, GenerationResult]:
        pending = {self.keys.events(j): j for j in job_ids}
        cursors = dict.fromkeys(pending, "0-0")
        done: dict[str, GenerationResult] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            block_ms = _block_ms(deadline, timeout_s, len(pending))
            reply = stream_reply(await self.client.xread({k: cursors[k] for k in pending}, block=block_ms, count=100))
            for stream, entries in reply:
                key = _text(stream)
                for entry_id, fields in entries:
                    cursors[key] = _text(entry_id)
                    if fields.get(b"type") == b"done":
                        job_id = pending.pop(key)
                        finished = await self.result(job_id)
                        if finished is None:
                            raise UnknownJob(job_id)
                        done[job_id] = finished
                        break
            if not reply:
                for job_id in pending.values():
                    if not await self.client.exists(self.keys.job(job_id)):
                        raise UnknownJob(job_id)
        return done

    async def tokens(self, job_id: str, timeout_s: float | None) -> AsyncIterator[TokenEvent]:
        """The job's tokens as they arrive (from the start, so a late reader misses none)."""
        key, cursor = self.keys.events(job_id), "0-0"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            block_ms = _block_ms(deadline, timeout_s, 1)
            reply = stream_reply(await self.client.xread({key: cursor}, block=block_ms, count=256))
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    cursor = _text(entry_id)
                    if fields.get(b"type") == b"done":
                        return
                    yield TokenEvent(job_id=job_id, index=int(fields[b"i"]), text=_text(fields[b"t"]))
            if not reply and not await self.client.exists(self.keys.job(job_id)):
                raise UnknownJob(job_id)

    async def status(self, job_id: str) -> JobStatus:
        return parse_status(job_id, await self.client.hgetall(self.keys.job(job_id)))

    async def cancel(self, job_id: str) -> JobState:
        """As JobStore.cancel: a queued job is finished as cancelled, a running one asked to stop."""

        async def attempt(pipe: Any) -> JobState:
            status = parse_status(job_id, await pipe.hgetall(self.keys.job(job_id)))
            if status.state.terminal:
                return status.state
            if status.state is JobState.RUNNING:
                pipe.multi()
                pipe.hset(self.keys.job(job_id), "cancel_requested", "1")
                pipe.publish(self.keys.cancel_channel, job_id)
                return JobState.RUNNING
            cancelled = cancelled_before_it_ran(status, await self.now())
            pipe.multi()
            finish = Finish(self.keys, cancelled, status.batch_id, self.result_ttl_s)
            await send_async(pipe, self.client, finish)
            return JobState.CANCELLED

        outcome = await self.client.transaction(attempt, self.keys.job(job_id), value_from_callable=True)
        return cast(JobState, outcome)

    async def now(self) -> datetime:
        seconds, micros = await self.client.time()
        return utc_from_micros(int(seconds) * 1_000_000 + int(micros))


def _block_ms(deadline: float | None, timeout_s: float | None, pending: int) -> int:
    if deadline is None:
        return MAX_BLOCK_MS
    left_ms = int((deadline - time.monotonic()) * 1000)
    if left_ms <= 0:
        raise TimeoutError(f"{pending} job(s) not finished after {timeout_s}s")
    return max(1, min(MAX_BLOCK_MS, left_ms))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
