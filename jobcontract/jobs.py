"""Job records and results in Redis: admission, start, finish, wait, cancel, status.

Every step that must not half-happen is one Lua script (admission: idempotency, backpressure,
pool choice, record and enqueue; start; finish). Results are keyed by job id alone, so a job
rerouted to another queue keeps its key, and the first terminal result wins: a job that runs
twice (a worker killed after finishing but before acking) is delivered to its caller once.
A per-job event stream announces tokens and the end, so waiters block in XREAD and wake at once.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import dramatiq
import redis

from jobcontract.connection import MAX_BLOCK_MS, stream_reply
from jobcontract.keys import Keys, actor_name, pool_name, queue_name
from jobcontract.models import (
    Backend,
    GenerationRequest,
    GenerationResult,
    JobError,
    JobState,
    JobStatus,
    Lane,
    Timings,
    TokenEvent,
    utc_from_micros,
)
from jobcontract.outage import ride_out
from jobcontract.routes import ModelRoute

# Redis's clock in integer microseconds (exact in a Lua double); `us` prints one without an exponent.
_NOW_US = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(n) return string.format('%.0f', n) end
"""

SUBMIT_SCRIPT = (
    _NOW_US
    + """
-- KEYS: job, idempotency, then (stream, pool, circuit) for each candidate backend in order, then the
-- set of known queues (so a queue nobody serves yet is still seen by rescuers and metrics).
-- ARGV: job_id, max_queued, ttl_s, timeout_us, model, lane, batch_id, use_idempotency, fingerprint,
--       then a message per candidate, then a queue name per candidate.
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing then
    -- The first request's fingerprint lives in its job record (KEYS[1] is that of the new id).
    local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1])
    local fingerprint = redis.call('HGET', prefix .. existing, 'fingerprint')
    if fingerprint and fingerprint ~= ARGV[9] then return {'conflict', existing, ''} end
    return {'existing', existing, ''}
  end
end
local candidates = (#KEYS - 3) / 3
local chosen, fallback = nil, nil
for i = 0, candidates - 1 do
  local live = redis.call('ZCOUNT', KEYS[4 + 3 * i], now, '+inf') > 0
  if live and redis.call('EXISTS', KEYS[5 + 3 * i]) == 0 then chosen = i break end
  if live and fallback == nil then fallback = i end
end
chosen = chosen or fallback or 0
local stream = KEYS[3 + 3 * chosen]
local queue = ARGV[10 + candidates + chosen]
if redis.call('XLEN', stream) >= tonumber(ARGV[2]) then return {'full', ARGV[1], queue} end
redis.call('HSET', KEYS[1], 'state', 'queued', 'model', ARGV[5], 'lane', ARGV[6], 'queue', queue,
           'enqueued_us', us(now), 'deadline_us', us(now + tonumber(ARGV[4])), 'starts', '0',
           'fingerprint', ARGV[9])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'batch', ARGV[7]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', stream, '*', 'm', ARGV[10 + chosen], 'r', '0')
redis.call('SADD', KEYS[#KEYS], queue)
if ARGV[8] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3]) end
return {'queued', ARGV[1], queue}
"""
)

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


class QueueFull(Exception):
    """The queue is at its configured bound; try again later instead of filling Redis."""

    def __init__(self, queue: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"queue {queue!r} is full; retry after {retry_after_s:.0f}s")
        self.queue = queue
        self.retry_after_s = retry_after_s


class IdempotencyConflict(Exception):
    """An idempotency key came back with another request than the one it first admitted.

    Answering with the first job would hand the caller a result for a request it did not make
    (OpenAI and Stripe refuse this too); the key is opaque, compared as given."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was used for another request (job {job_id!r})")
        self.key = key
        self.job_id = job_id


class UnknownJob(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (never submitted, or its record expired)")
        self.job_id = job_id


@dataclass(frozen=True)
class Receipt:
    job_id: str
    queue: str
    duplicate: bool  # an idempotency key matched an earlier job: this is that job


@dataclass(frozen=True)
class StartTicket:
    """What a worker learns when it starts a job: the instants it needs, on the Redis clock."""

    enqueued_us: int
    deadline_us: int
    started_us: int

    @property
    def remaining_s(self) -> float:
        return (self.deadline_us - self.started_us) / 1_000_000


def request_fingerprint(request: GenerationRequest) -> str:
    """sha256 of the request's canonical JSON without its idempotency key: equal for the same ask,
    however it was spelled (defaults included, keys sorted)."""
    body = request.model_dump(mode="json", exclude={"idempotency_key"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_job_id() -> str:
    return uuid.uuid4().hex


def candidate_backends(route: ModelRoute, preferred: Backend | None) -> list[Backend]:
    order = list(route.order)
    if preferred is not None and preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    return order


def build_message(
    job_id: str,
    request: GenerationRequest,
    queue: str,
    lane: Lane,
    *,
    attempts: Sequence[dict[str, Any]] = (),
    batch_id: str | None = None,
) -> dramatiq.Message[Any]:
    """The dramatiq message a worker's actor receives: one attempt's worth of the job."""
    kwargs: dict[str, Any] = {
        "request": request.model_dump(mode="json", exclude_defaults=True),
        "attempts": list(attempts),
    }
    if batch_id is not None:
        kwargs["batch_id"] = batch_id
    return dramatiq.Message(
        queue_name=queue,
        actor_name=actor_name(lane),
        args=(job_id,),
        kwargs=kwargs,
        options={},
        message_id=job_id,
    )


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
        route_for: Any,
        default_timeout_s: float,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[Receipt]:
        """Admit requests in one round trip; each is admitted or refused on its own."""
        calls = self._submit_calls(requests, route_for, default_timeout_s, batch_id, job_ids)
        if len(calls) == 1:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS, a second round trip
            replies = [self._submit(keys=calls[0][0], args=calls[0][1])]
        else:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._submit(keys=keys, args=args, client=pipe)
            replies = pipe.execute(raise_on_error=True)
        return parse_receipts(replies, requests)

    def _submit_calls(
        self,
        requests: Sequence[GenerationRequest],
        route_for: Any,
        default_timeout_s: float,
        batch_id: str | None,
        job_ids: Sequence[str] | None,
    ) -> list[tuple[list[str], list[Any]]]:
        """The admission script's keys and arguments for each request (new job ids unless given)."""
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in requests]
        return [
            self._submit_call(job_id, request, route_for(request.model), default_timeout_s, batch_id)
            for job_id, request in zip(ids, requests, strict=True)
        ]

    def _submit_call(
        self,
        job_id: str,
        request: GenerationRequest,
        route: ModelRoute,
        default_timeout_s: float,
        batch_id: str | None,
    ) -> tuple[list[str], list[Any]]:
        keys = [self.keys.job(job_id), self.keys.idempotency(request.idempotency_key or job_id)]
        messages, queues = [], []
        for backend in candidate_backends(route, request.backend):
            queue = queue_name(request.model, backend, request.lane)
            pool = pool_name(request.model, backend)
            keys += [self.keys.stream(queue), self.keys.pool(pool), self.keys.circuit(pool)]
            messages.append(build_message(job_id, request, queue, request.lane, batch_id=batch_id).encode())
            queues.append(queue)
        keys.append(self.keys.queues)
        timeout_us = int((request.timeout_s or default_timeout_s) * 1_000_000)
        args = [
            job_id,
            self.max_queued,
            self.result_ttl_s,
            timeout_us,
            request.model,
            request.lane.value,
            batch_id or "",
            "1" if request.idempotency_key else "0",
            request_fingerprint(request),
            *messages,
            *queues,
        ]
        return keys, args

    def result(self, job_id: str) -> GenerationResult | None:
        raw = self.client.hget(self.keys.job(job_id), "result")
        return None if raw is None else GenerationResult.model_validate_json(raw)

    def wait(self, job_id: str, timeout_s: float | None) -> GenerationResult:
        """Block until the job has a terminal result; TimeoutError if it takes longer than timeout_s."""
        return self.wait_many([job_id], timeout_s)[job_id]

    def wait_many(self, job_ids: Iterable[str], timeout_s: float | None) -> dict[str, GenerationResult]:
        pending = {self.keys.events(j): j for j in job_ids}
        cursors = dict.fromkeys(pending, "0-0")
        done: dict[str, GenerationResult] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            block_ms = MAX_BLOCK_MS
            if deadline is not None:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    raise TimeoutError(f"{len(pending)} job(s) not finished after {timeout_s}s")
                block_ms = max(1, min(block_ms, left_ms))
            reply = stream_reply(self.client.xread({k: cursors[k] for k in pending}, block=block_ms, count=100))
            for stream, entries in reply:
                key = _text(stream)
                for entry_id, fields in entries:
                    cursors[key] = _text(entry_id)
                    if fields.get(b"type") == b"done":
                        job_id = pending.pop(key)
                        finished = self.result(job_id)
                        if finished is None:
                            raise UnknownJob(job_id)
                        done[job_id] = finished
                        break
            if not reply:
                self._fail_unknown(pending.values())
        return done

    def _fail_unknown(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            if not self.client.exists(self.keys.job(job_id)):
                raise UnknownJob(job_id)

    def tokens(self, job_id: str, timeout_s: float | None) -> Iterable[TokenEvent]:
        """Yield the job's tokens as they arrive (from the start, so a late reader misses none)."""
        key, cursor = self.keys.events(job_id), "0-0"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id} still streaming after {timeout_s}s")
            block_ms = MAX_BLOCK_MS if remaining is None else max(1, min(MAX_BLOCK_MS, int(remaining * 1000)))
            for _stream, entries in stream_reply(self.client.xread({key: cursor}, block=block_ms, count=256)):
                for entry_id, fields in entries:
                    cursor = _text(entry_id)
                    if fields.get(b"type") == b"done":
                        return
                    yield TokenEvent(job_id=job_id, index=int(fields[b"i"]), text=_text(fields[b"t"]))

    def status(self, job_id: str) -> JobStatus:
        return parse_status(job_id, self.client.hgetall(self.keys.job(job_id)))

    def cancel(self, job_id: str) -> JobState:
        """A queued job is finished as cancelled at once (it will never run); a running one is asked to
        stop, and its worker aborts the server request and records it as cancelled."""

        def attempt(pipe: redis.client.Pipeline) -> JobState:
            fields = pipe.hgetall(self.keys.job(job_id))
            status = parse_status(job_id, fields)
            if status.state.terminal:
                return status.state
            if status.state is JobState.RUNNING:
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
        seconds, micros = ride_out(self.client.time, self.outage_patience_s)
        return utc_from_micros(int(seconds) * 1_000_000 + int(micros))

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
        return bool(ride_out(lambda: self._finish(keys=keys, args=args), self.outage_patience_s))

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


def parse_receipts(replies: Iterable[Any], requests: Sequence[GenerationRequest]) -> list[Receipt]:
    """What the admission script answered, one reply per request; a full queue refuses the lot."""
    receipts = []
    for reply, request in zip(replies, requests, strict=True):
        status, job_id, queue = (_text(v) for v in reply)
        if status == "full":
            raise QueueFull(queue)
        if status == "conflict":
            raise IdempotencyConflict(request.idempotency_key or job_id, job_id)
        receipts.append(Receipt(job_id=job_id, queue=queue, duplicate=status == "existing"))
    return receipts


def cancelled_before_it_ran(status: JobStatus, now: datetime) -> GenerationResult:
    """The result of a job cancelled while queued: it will never run."""
    return GenerationResult(
        job_id=status.job_id,
        model=status.model,
        state=JobState.CANCELLED,
        finish_reason="cancelled",
        timings=Timings(enqueued_at=status.enqueued_at, finished_at=now),
        error=JobError(type="cancelled", message="cancelled before it ran"),
    )


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
