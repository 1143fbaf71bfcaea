"""The job store's caller side on `redis.asyncio`, for the HTTP gateway and the async client.

The operations (jobcontract.protocol: script, keys, arguments, reply) and the parsing of records are
the ones JobStore runs, used here as they are: only the waiting (XREAD) and the round trips are async.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, cast

import redis.asyncio as aioredis

from jobcontract.admission import Admission, Receipt, refuse_too_large
from jobcontract.connection import connect_async as connect_async  # where the gateway and clients look
from jobcontract.connection import stream_reply
from jobcontract.durability import add_wait, admitted, durability_of
from jobcontract.fleet import FleetCache
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
)
from jobcontract.protocol.jobs import Finish, Submit
from jobcontract.protocol.operation import run_async, send_async
from jobcontract.protocol.placement import ReadModels
from jobcontract.routes import ModelRoute
from jobcontract.waiting import (
    RESULTS_PER_READ,
    TOKENS_PER_READ,
    CancelStep,
    ResultWait,
    StoredResult,
    TokenRead,
    cancel_step,
    parse_result,
    redis_instant,
)


class AsyncJobStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, result_ttl_s: int, max_queued: int) -> None:
        self.client = client
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.max_queued = max_queued
        self.fleet = FleetCache()

    async def submit(
        self,
        request: GenerationRequest,
        route: ModelRoute,
        *,
        default_timeout_s: float,
        batch_id: str | None = None,
        job_id: str | None = None,
        tenant: str | None = None,
    ) -> Receipt:
        receipts = await self.submit_many(
            [request],
            route_for=lambda _: route,
            default_timeout_s=default_timeout_s,
            batch_id=batch_id,
            job_ids=[job_id or new_job_id()],
            tenant=tenant,
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
        tenant: str | None = None,
    ) -> list[Receipt]:
        """As JobStore.submit_many: the whole list in one script, or none of it; `tenant` names the
        gateway tenant of the jobs in that same script (see jobcontract.protocol.jobs.Submit)."""
        if not requests:
            return []
        fleet = await self.fleet.get_async(lambda: run_async(self.client, ReadModels(self.keys)))
        refuse_too_large((r.model for r in requests), fleet)
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in requests]
        admission = Admission(self.keys, self.max_queued, self.result_ttl_s, default_timeout_s)
        submit = Submit(admission, requests, ids, route_for, batch_id, tenant)
        if not durability_of(self.client).waits:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS
            return await run_async(self.client, submit)
        pipe = self.client.pipeline(transaction=False)
        await send_async(pipe, self.client, submit)
        durability = add_wait(pipe, self.client)
        return submit.parse(admitted(await pipe.execute(raise_on_error=True), durability, self.client))

    async def result(self, job_id: str) -> GenerationResult | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.job(job_id), *StoredResult.FIELDS)
        pipe.xrevrange(self.keys.events(job_id), count=1)
        fields, last = await pipe.execute()
        stored = StoredResult(fields)
        at = stored.missing(last)
        return parse_result(stored.find(await self.client.xrange(self.keys.events(job_id), at, at) if at else last))

    async def wait(self, job_id: str, timeout_s: float | None) -> GenerationResult:
        return (await self.wait_many([job_id], timeout_s))[job_id]

    async def wait_many(self, job_ids: Iterable[str], timeout_s: float | None) -> dict[str, GenerationResult]:
        wait = ResultWait(self.keys, job_ids, timeout_s)
        done: dict[str, GenerationResult] = {}
        while wait.pending:
            reply = stream_reply(await self.client.xread(wait.streams(), block=wait.block_ms(), count=RESULTS_PER_READ))
            for job_id in wait.take(reply):
                done[job_id] = wait.carried(job_id) or await self._ended(job_id)
            if not reply:
                await self._fail_unknown(wait.pending.values())
        return done

    async def _ended(self, job_id: str) -> GenerationResult:
        finished = await self.result(job_id)
        if finished is None:
            raise UnknownJob(job_id)
        return finished

    async def _fail_unknown(self, job_ids: Iterable[str]) -> None:
        for job_id in list(job_ids):
            if not await self.client.exists(self.keys.job(job_id)):
                raise UnknownJob(job_id)

    async def tokens(self, job_id: str, timeout_s: float | None) -> AsyncIterator[TokenEvent]:
        """As JobStore.tokens: each index once, from the start."""
        read = TokenRead(self.keys, job_id, timeout_s)
        while not read.done:
            reply = stream_reply(await self.client.xread(read.streams(), block=read.block_ms(), count=TOKENS_PER_READ))
            for token in read.take(reply):
                yield token
            if not reply:
                await self._fail_unknown([job_id])

    async def status(self, job_id: str) -> JobStatus:
        return parse_status(job_id, await self.client.hgetall(self.keys.job(job_id)))

    async def cancel(self, job_id: str) -> JobState:
        """As JobStore.cancel: a queued job is finished as cancelled, a running one asked to stop."""

        async def attempt(pipe: Any) -> JobState:
            status = parse_status(job_id, await pipe.hgetall(self.keys.job(job_id)))
            step = cancel_step(status)
            if step is CancelStep.NOTHING:
                return status.state
            if step is CancelStep.ASK_WORKER:
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
        return redis_instant(await self.client.time())
