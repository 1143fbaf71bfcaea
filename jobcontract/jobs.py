"""Job records and results in Redis: admission, start, finish, wait, cancel, status.

Every step that must not half-happen is one operation of jobcontract.protocol, run here (admission
of a whole list: idempotency, backpressure, pool choice, record and enqueue, see
jobcontract.admission; start; finish).
Results are keyed by job id alone, so a job rerouted to another queue keeps its key, and the
first terminal result wins: a job that runs twice (a worker killed after finishing but before
acking) is delivered to its caller once.
A per-job event stream announces tokens and the end, so waiters block in XREAD and wake at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, cast

import redis

from jobcontract import results
from jobcontract.admission import SUBMIT_SCRIPT as SUBMIT_SCRIPT
from jobcontract.admission import Admission, Receipt, refuse_too_large
from jobcontract.admission import IdempotencyConflict as IdempotencyConflict  # callers catch these from here
from jobcontract.admission import ModelTooLarge as ModelTooLarge
from jobcontract.admission import QueueFull as QueueFull
from jobcontract.admission import candidate_backends as candidate_backends
from jobcontract.connection import stream_reply
from jobcontract.durability import add_wait, admitted, durability_of, finished
from jobcontract.fleet import FleetCache
from jobcontract.keys import Keys
from jobcontract.models import (
    Backend,
    GenerationRequest,
    GenerationResult,
    JobState,
    JobStatus,
    Lane,
    TokenEvent,
    utc_from_micros,
)
from jobcontract.outage import ride_out
from jobcontract.protocol.jobs import Finish, Start, Submit
from jobcontract.protocol.jobs import StartTicket as StartTicket  # workers read tickets from here
from jobcontract.protocol.operation import run, send
from jobcontract.protocol.placement import ReadModels
from jobcontract.routes import ModelRoute
from jobcontract.waiting import (
    RESULTS_PER_READ,
    TOKENS_PER_READ,
    CancelStep,
    JobEnd,
    ResultWait,
    StoredResult,
    TokenRead,
    cancel_step,
    parse_result,
    redis_instant,
    token_event,
)


class UnknownJob(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (never submitted, or its record expired)")
        self.job_id = job_id


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(
        self, client: redis.Redis, keys: Keys, *, result_ttl_s: int, max_queued: int, outage_patience_s: float = 0.0
    ) -> None:
        """`outage_patience_s`: how long the worker-side calls (start, tokens, finish, now) wait out a
        Redis outage before raising; workers set it, callers keep 0 and fail at once."""
        self.client = client
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.max_queued = max_queued
        self.outage_patience_s = outage_patience_s
        self.fleet = FleetCache()

    # -- callers -------------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        route: ModelRoute,
        *,
        default_timeout_s: float,
        batch_id: str | None = None,
        job_id: str | None = None,
        tenant: str | None = None,
    ) -> Receipt:
        return self.submit_many(
            [request],
            route_for=lambda _: route,
            default_timeout_s=default_timeout_s,
            batch_id=batch_id,
            job_ids=[job_id or new_job_id()],
            tenant=tenant,
        )[0]

    def check_sizes(self, models: Iterable[str]) -> None:
        """ModelTooLarge for a model no live worker's memory budget can hold (admission's check, which
        a batch runs on all its models before it queues a line)."""
        refuse_too_large(models, self.fleet.get(lambda: run(self.client, ReadModels(self.keys))))

    def submit_many(
        self,
        requests: Sequence[GenerationRequest],
        *,
        route_for: Callable[[str], ModelRoute],
        default_timeout_s: float,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
        tenant: str | None = None,
    ) -> list[Receipt]:
        """Admit the whole list in one script, or none of it: QueueFull or IdempotencyConflict
        means nothing of the list was queued, so retrying the same list cannot duplicate a part of it
        (see jobcontract.admission). A list larger than a queue's bound is never admitted: split it.
        ModelTooLarge: a model no live worker's memory budget can hold (nothing queued either)."""
        if not requests:
            return []
        self.check_sizes(r.model for r in requests)
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in requests]
        submit = Submit(self.admission(default_timeout_s), requests, ids, route_for, batch_id, tenant)
        if not durability_of(self.client).waits:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS
            return run(self.client, submit)
        pipe = self.client.pipeline(transaction=False)
        send(pipe, self.client, submit)
        durability = add_wait(pipe, self.client)  # WAIT for a replica, on the writes' connection
        return submit.parse(admitted(pipe.execute(raise_on_error=True), durability, self.client))

    def admission(self, default_timeout_s: float) -> Admission:
        return Admission(self.keys, self.max_queued, self.result_ttl_s, default_timeout_s)

    def result(self, job_id: str) -> GenerationResult | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.job(job_id), *StoredResult.FIELDS)
        pipe.xrevrange(self.keys.events(job_id), count=1)
        fields, last = pipe.execute()
        return parse_result(self._find(job_id, StoredResult(fields), last))

    def _find(self, job_id: str, stored: StoredResult, last: list[Any]) -> bytes | None:
        at = stored.missing(last)
        return stored.find(self.client.xrange(self.keys.events(job_id), at, at) if at else last)

    def ends(self, job_ids: Sequence[str], *, mark: str) -> list[JobEnd]:
        """Each job's state and result in one round trip (two for a result behind a stray token), with
        whether the caller's own `mark` field is set on its record (a batch marks a job whose line it wrote)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "state", mark, *StoredResult.FIELDS)
            pipe.xrevrange(self.keys.events(job_id), count=1)
        replies = pipe.execute()
        ends = []
        for n, job_id in enumerate(job_ids):
            (state, marked, *fields), last = replies[2 * n], replies[2 * n + 1]
            ends.append(
                JobEnd(
                    job_id=job_id,
                    state=None if state is None else JobState(_text(state)),
                    result=parse_result(self._find(job_id, StoredResult(fields), last)),
                    marked=marked is not None,
                )
            )
        return ends

    def wait(self, job_id: str, timeout_s: float | None) -> GenerationResult:
        """Block until the job has a terminal result; TimeoutError if it takes longer than timeout_s."""
        return self.wait_many([job_id], timeout_s)[job_id]

    def wait_many(self, job_ids: Iterable[str], timeout_s: float | None) -> dict[str, GenerationResult]:
        wait = ResultWait(self.keys, job_ids, timeout_s)
        done: dict[str, GenerationResult] = {}
        while wait.pending:
            reply = stream_reply(self.client.xread(wait.streams(), block=wait.block_ms(), count=RESULTS_PER_READ))
            for job_id in wait.take(reply):
                done[job_id] = wait.carried(job_id) or self._ended(job_id)
            if not reply:
                self._fail_unknown(wait.pending.values())
        return done

    def _ended(self, job_id: str) -> GenerationResult:
        finished = self.result(job_id)
        if finished is None:
            raise UnknownJob(job_id)
        return finished

    def _fail_unknown(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            if not self.client.exists(self.keys.job(job_id)):
                raise UnknownJob(job_id)

    def tokens(self, job_id: str, timeout_s: float | None) -> Iterable[TokenEvent]:
        """Yield the job's tokens as they arrive, each index once (see jobcontract.waiting.TokenRead)."""
        read = TokenRead(self.keys, job_id, timeout_s)
        while not read.done:
            reply = stream_reply(self.client.xread(read.streams(), block=read.block_ms(), count=TOKENS_PER_READ))
            yield from read.take(reply)
            if not reply:
                self._fail_unknown([job_id])

    def status(self, job_id: str) -> JobStatus:
        return parse_status(job_id, self.client.hgetall(self.keys.job(job_id)))

    def cancel(self, job_id: str) -> JobState:
        """A queued job is finished as cancelled at once (it will never run); a running one is asked to
        stop, and its worker aborts the server request and records it as cancelled."""

        def attempt(pipe: redis.client.Pipeline) -> JobState:
            status = parse_status(job_id, pipe.hgetall(self.keys.job(job_id)))
            step = cancel_step(status)
            if step is CancelStep.NOTHING:
                return status.state
            if step is CancelStep.ASK_WORKER:
                pipe.multi()
                pipe.hset(self.keys.job(job_id), "cancel_requested", "1")
                pipe.publish(self.keys.cancel_channel, job_id)
                return JobState.RUNNING
            cancelled = cancelled_before_it_ran(status, self.now())
            pipe.multi()
            send(pipe, self.client, Finish(self.keys, cancelled, status.batch_id, self.result_ttl_s))
            return JobState.CANCELLED

        outcome = self.client.transaction(attempt, self.keys.job(job_id), value_from_callable=True)  # type: ignore[arg-type]
        return cast(JobState, outcome)

    def now(self) -> datetime:
        return redis_instant(ride_out(self.client.time, self.outage_patience_s))

    # -- workers -------------------------------------------------------------------------------------
    def start(self, job_id: str, worker: str, backend: Backend, queue: str) -> StartTicket | JobState | None:
        """Mark the job running. Returns a ticket to run it; a terminal state if it is already done
        (a duplicate delivery); CANCELLED if a cancel was asked for; None if its record is gone."""
        start = Start(self.keys, job_id, worker, backend, queue)
        return ride_out(lambda: run(self.client, start), self.outage_patience_s)

    def publish_token(self, job_id: str, index: int, text: str) -> None:
        self.publish_tokens(job_id, index, [text])

    def publish_tokens(self, job_id: str, first: int, texts: list[str]) -> None:
        """Tokens `first`, `first + 1`, ... in one event (`token` for one, `tokens` for several: see
        jobcontract.waiting.TokenRead), so a worker grouping fast tokens sends one XADD for them."""
        key = self.keys.events(job_id)
        event = token_event(first, texts)

        def publish() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(key, event)
            if first == 0:
                pipe.expire(key, self.result_ttl_s)
            pipe.execute()

        ride_out(publish, self.outage_patience_s)

    def finish(self, result: GenerationResult, batch_id: str | None = None) -> bool:
        """Record a terminal result once; False when another run already finished the job."""
        finish = Finish(self.keys, result, batch_id, self.result_ttl_s)
        if not durability_of(self.client).waits:
            return ride_out(lambda: run(self.client, finish), self.outage_patience_s)

        def finish_and_wait() -> bool:  # WAIT for a replica on the same connection as the write
            pipe = self.client.pipeline(transaction=False)
            send(pipe, self.client, finish)
            durability = add_wait(pipe, self.client)
            return finish.parse(finished(pipe.execute(raise_on_error=True), durability, self.client, result.job_id)[0])

        return ride_out(finish_and_wait, self.outage_patience_s)


def cancelled_before_it_ran(status: JobStatus, now: datetime) -> GenerationResult:
    """The result of a job cancelled while queued: it will never run."""
    return results.cancelled(status.job_id, status.model, enqueued_at=status.enqueued_at, finished_at=now)


def parse_status(job_id: str, fields: dict[Any, Any]) -> JobStatus:
    if not fields:
        raise UnknownJob(job_id)
    f = {_text(k): _text(v) for k, v in fields.items()}

    def instant(name: str) -> datetime | None:
        return utc_from_micros(int(f[name])) if name in f else None

    enqueued = instant("enqueued_us")
    assert enqueued is not None
    return JobStatus(
        job_id=job_id,
        state=JobState(f["state"]),
        model=f["model"],
        queue=f["queue"],
        lane=Lane(f["lane"]),
        backend=Backend(f["backend"]) if "backend" in f else None,
        worker=f.get("worker"),
        starts=int(f.get("starts", 0)),
        cancel_requested=f.get("cancel_requested") == "1",
        enqueued_at=enqueued,
        started_at=instant("started_us"),
        finished_at=instant("finished_us"),
        batch_id=f.get("batch"),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
