"""Job records and results in Redis: admission, start, finish, wait, cancel, status.

Every step that must not half-happen is one Lua script (admission of a whole list: idempotency,
backpressure, pool choice, record and enqueue, see jobcontract.admission; start; finish).
Results are keyed by job id alone, so a job rerouted to another queue keeps its key, and the
first terminal result wins: a job that runs twice (a worker killed after finishing but before
acking) is delivered to its caller once.
A per-job event stream announces tokens and the end, so waiters block in XREAD and wake at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis

from jobcontract import results
from jobcontract.admission import SUBMIT_SCRIPT as SUBMIT_SCRIPT
from jobcontract.admission import Admission, Receipt, parse_receipts
from jobcontract.admission import IdempotencyConflict as IdempotencyConflict  # callers catch these from here
from jobcontract.admission import QueueFull as QueueFull
from jobcontract.admission import candidate_backends as candidate_backends
from jobcontract.connection import stream_reply
from jobcontract.durability import add_wait, admitted, durability_of, finished
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
from jobcontract.routes import ModelRoute
from jobcontract.waiting import (
    RESULTS_PER_READ,
    TOKENS_PER_READ,
    CancelStep,
    JobEnd,
    ResultWait,
    TokenRead,
    cancel_step,
    redis_instant,
)

# Redis's clock in integer microseconds (exact in a Lua double); `us` prints one without an exponent.
_NOW_US = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(n) return string.format('%.0f', n) end
"""

START_SCRIPT = (
    _NOW_US
    + """
-- KEYS: job. ARGV: worker, backend, queue.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return {state} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel'} end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_us', us(now), 'worker', ARGV[1],
           'backend', ARGV[2], 'queue', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'starts', 1)
return {'run', redis.call('HGET', KEYS[1], 'enqueued_us'), redis.call('HGET', KEYS[1], 'deadline_us'),
        us(now)}
"""
)

FINISH_SCRIPT = (
    _NOW_US
    + """
-- KEYS: job, events, batch-done stream (the job key again when there is no batch).
-- ARGV: state, result json, ttl_s, job_id, has_batch.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'result', ARGV[2], 'finished_us', us(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'state', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[4], 'state', ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
"""
)

# FINISH for a job that no worker can finish: one whose stream entry goes to dead letters without a
# run that ended (its workers kept dying). Called from the broker's scripts, which know only the
# stream key, so the namespace is read from it and the key layout of `Keys` is spelled out here.
# Timings are Unix seconds (cjson keeps 0.1 ms), which GenerationResult reads like ISO instants.
FAIL_JOB_LUA = """
local function fail_job(stream, message, error_type, reason)
  local ok, decoded = pcall(cjson.decode, message)
  local namespace = string.match(stream, '^(.-):q:')
  if not ok or type(decoded) ~= 'table' or type(decoded['message_id']) ~= 'string' or not namespace then
    return 0
  end
  local job_id = decoded['message_id']
  local job = namespace .. ':job:' .. job_id
  local state = redis.call('HGET', job, 'state')
  if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local f = redis.call('HMGET', job, 'model', 'worker', 'enqueued_us', 'started_us', 'backend', 'batch')
  local result = {job_id = job_id, model = f[1] or '', state = 'failed', finish_reason = 'error',
                  timings = {enqueued_at = tonumber(f[3] or now) / 1e6, finished_at = now / 1e6},
                  error = {type = error_type, message = reason, retryable = true}}
  if f[2] then result['worker'] = f[2] end
  if f[4] then result['timings']['started_at'] = tonumber(f[4]) / 1e6 end
  if f[5] then result['backend'] = f[5] end
  local ttl = redis.call('TTL', job)
  redis.call('HSET', job, 'state', 'failed', 'result', cjson.encode(result), 'finished_us', string.format('%.0f', now))
  redis.call('XADD', job .. ':events', '*', 'type', 'done', 'state', 'failed')
  if ttl > 0 then redis.call('EXPIRE', job .. ':events', ttl) end
  if f[6] then
    local done = namespace .. ':batch:' .. f[6] .. ':done'
    redis.call('XADD', done, '*', 'job', job_id, 'state', 'failed')
    if ttl > 0 then redis.call('EXPIRE', done, ttl) end
  end
  return 1
end
"""


class UnknownJob(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (never submitted, or its record expired)")
        self.job_id = job_id


@dataclass(frozen=True)
class StartTicket:
    """What a worker learns when it starts a job: the instants it needs, on the Redis clock."""

    enqueued_us: int
    deadline_us: int
    started_us: int

    @property
    def remaining_s(self) -> float:
        return (self.deadline_us - self.started_us) / 1_000_000


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
        self._submit = client.register_script(SUBMIT_SCRIPT)
        self._start = client.register_script(START_SCRIPT)
        self._finish = client.register_script(FINISH_SCRIPT)

    # -- callers -------------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        route: ModelRoute,
        *,
        default_timeout_s: float,
        batch_id: str | None = None,
        job_id: str | None = None,
    ) -> Receipt:
        return self.submit_many(
            [request],
            route_for=lambda _: route,
            default_timeout_s=default_timeout_s,
            batch_id=batch_id,
            job_ids=[job_id or new_job_id()],
        )[0]

    def submit_many(
        self,
        requests: Sequence[GenerationRequest],
        *,
        route_for: Callable[[str], ModelRoute],
        default_timeout_s: float,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[Receipt]:
        """Admit the whole list in one script, or none of it: QueueFull or IdempotencyConflict
        means nothing of the list was queued, so retrying the same list cannot duplicate a part of it
        (see jobcontract.admission). A list larger than a queue's bound is never admitted: split it."""
        if not requests:
            return []
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in requests]
        keys, args = self.admission(default_timeout_s).call(requests, ids, route_for, batch_id)
        if not durability_of(self.client).waits:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS
            return parse_receipts(self._submit(keys=keys, args=args), requests, ids)
        pipe = self.client.pipeline(transaction=False)
        self._submit(keys=keys, args=args, client=pipe)
        durability = add_wait(pipe, self.client)  # WAIT for a replica, on the writes' connection
        return parse_receipts(admitted(pipe.execute(raise_on_error=True), durability, self.client), requests, ids)

    def admission(self, default_timeout_s: float) -> Admission:
        return Admission(self.keys, self.max_queued, self.result_ttl_s, default_timeout_s)

    def result(self, job_id: str) -> GenerationResult | None:
        raw = self.client.hget(self.keys.job(job_id), "result")
        return None if raw is None else GenerationResult.model_validate_json(raw)

    def ends(self, job_ids: Sequence[str], *, mark: str) -> list[JobEnd]:
        """Each job's state and result in one round trip, with whether the caller's own `mark` field
        is set on its record (a batch marks a job whose line it wrote)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "state", "result", mark)
        return [
            JobEnd(
                job_id=job_id,
                state=None if state is None else JobState(_text(state)),
                result=None if raw is None else GenerationResult.model_validate_json(raw),
                marked=marked is not None,
            )
            for job_id, (state, raw, marked) in zip(job_ids, pipe.execute(), strict=True)
        ]

    def wait(self, job_id: str, timeout_s: float | None) -> GenerationResult:
        """Block until the job has a terminal result; TimeoutError if it takes longer than timeout_s."""
        return self.wait_many([job_id], timeout_s)[job_id]

    def wait_many(self, job_ids: Iterable[str], timeout_s: float | None) -> dict[str, GenerationResult]:
        wait = ResultWait(self.keys, job_ids, timeout_s)
        done: dict[str, GenerationResult] = {}
        while wait.pending:
            reply = stream_reply(self.client.xread(wait.streams(), block=wait.block_ms(), count=RESULTS_PER_READ))
            for job_id in wait.take(reply):
                done[job_id] = self._ended(job_id)
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
            self._finish(
                keys=self._finish_keys(job_id, status.batch_id),
                args=self._finish_args(cancelled, status.batch_id),
                client=pipe,
            )
            return JobState.CANCELLED

        outcome = self.client.transaction(attempt, self.keys.job(job_id), value_from_callable=True)  # type: ignore[arg-type]
        return cast(JobState, outcome)

    def now(self) -> datetime:
        return redis_instant(ride_out(self.client.time, self.outage_patience_s))

    # -- workers -------------------------------------------------------------------------------------
    def start(self, job_id: str, worker: str, backend: Backend, queue: str) -> StartTicket | JobState | None:
        """Mark the job running. Returns a ticket to run it; a terminal state if it is already done
        (a duplicate delivery); CANCELLED if a cancel was asked for; None if its record is gone."""
        reply = [
            _text(v)
            for v in ride_out(
                lambda: self._start(keys=[self.keys.job(job_id)], args=[worker, backend.value, queue]),
                self.outage_patience_s,
            )
        ]
        if reply[0] == "run":
            return StartTicket(enqueued_us=int(reply[1]), deadline_us=int(reply[2]), started_us=int(reply[3]))
        if reply[0] == "missing":
            return None
        if reply[0] == "cancel":
            return JobState.CANCELLED
        return JobState(reply[0])

    def publish_token(self, job_id: str, index: int, text: str) -> None:
        key = self.keys.events(job_id)

        def publish() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(key, {"type": "token", "i": index, "t": text})
            if index == 0:
                pipe.expire(key, self.result_ttl_s)
            pipe.execute()

        ride_out(publish, self.outage_patience_s)

    def finish(self, result: GenerationResult, batch_id: str | None = None) -> bool:
        """Record a terminal result once; False when another run already finished the job."""
        keys, args = self._finish_keys(result.job_id, batch_id), self._finish_args(result, batch_id)
        if not durability_of(self.client).waits:
            return bool(ride_out(lambda: self._finish(keys=keys, args=args), self.outage_patience_s))

        def finish_and_wait() -> Any:  # WAIT for a replica on the same connection as the write
            pipe = self.client.pipeline(transaction=False)
            self._finish(keys=keys, args=args, client=pipe)
            durability = add_wait(pipe, self.client)
            return finished(pipe.execute(raise_on_error=True), durability, self.client, result.job_id)[0]

        return bool(ride_out(finish_and_wait, self.outage_patience_s))

    def _finish_keys(self, job_id: str, batch_id: str | None) -> list[str]:
        batch_key = self.keys.batch_done(batch_id) if batch_id else self.keys.job(job_id)
        return [self.keys.job(job_id), self.keys.events(job_id), batch_key]

    def _finish_args(self, result: GenerationResult, batch_id: str | None) -> list[Any]:
        return [
            result.state.value,
            result.model_dump_json(),
            self.result_ttl_s,
            result.job_id,
            "1" if batch_id else "0",
        ]


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
