"""Admission: a list of requests becomes queued jobs in one Lua script, all of them or none.

The script first decides every request (which job already answers it, which queue a new one goes
to, whether that queue has room) and only then writes, so a refusal (a full queue, an idempotency
key reused with another request) leaves nothing behind: a caller that retries after an error can
never duplicate the part of a list that got in. A job id that already has a record is never queued
again; the script answers with that job instead. So a resent script (redis-py sends a command again
after a socket timeout or a dropped connection, though the first may have run) admits nothing twice,
and a result once read is never replaced by a second run of the same id.

Each job records a fingerprint of its request; an idempotency key or a job id that comes back with
another request is refused with IdempotencyConflict rather than answered with the first job.

All or nothing rather than "return what got in": a caller that meets an exception knows that
nothing changed and may send the same list again as it is, while a partial answer would have to be
read by every caller (the batch runner, the gateway, scripts using Client.submit_many), and one lost
with the connection would leave queued jobs nobody knows the ids of. The cost is that a list longer
than a queue's free room waits whole: split it (the batch runner halves its chunk when refused).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq

from jobcontract.keys import Keys, actor_name, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, Lane
from jobcontract.routes import ModelRoute

SUBMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(n) return string.format('%.0f', n) end
-- KEYS: the set of known queues (so a queue nobody serves yet is still seen by rescuers and
--       metrics), then per request: job, idempotency, and (stream, pool, circuit) per candidate.
-- ARGV: max_queued, ttl_s, then per request: job_id, timeout_us, model, lane, batch_id,
--       use_idempotency, fingerprint, candidates n, n messages, n queue names.
-- Answers {status, job_id, queue} per request ('queued' or 'existing'), or one refusal for the
-- whole list, written before anything is: {'full', index, queue} or {'conflict', index, job_id}.
local max_queued, ttl = tonumber(ARGV[1]), ARGV[2]
local plans, planned, planned_key, added = {}, {}, {}, {}
local k, a, index = 2, 3, 0
while a <= #ARGV do
  index = index + 1
  local job_key, idem_key = KEYS[k], KEYS[k + 1]
  local job_id, fingerprint, n = ARGV[a], ARGV[a + 6], tonumber(ARGV[a + 7])
  local use_idem = ARGV[a + 5] == '1'
  -- The job that already answers this request: its idempotency key's, or its id's own.
  local owner = use_idem and (planned_key[idem_key] or redis.call('GET', idem_key)) or nil
  if not owner and (planned[job_key] or redis.call('EXISTS', job_key) == 1) then owner = job_id end
  if owner then
    local owner_key = string.sub(job_key, 1, #job_key - #job_id) .. owner
    local known = planned[owner_key]
    local fields = known and {known.fingerprint, known.queue}
      or redis.call('HMGET', owner_key, 'fingerprint', 'queue')
    if fields[1] and fields[1] ~= fingerprint then return {{'conflict', tostring(index), owner}} end
    plans[index] = {status = 'existing', job_id = owner, queue = fields[2] or ''}
  else
    local chosen, fallback = nil, nil
    for i = 0, n - 1 do
      local live = redis.call('ZCOUNT', KEYS[k + 3 + 3 * i], now, '+inf') > 0
      if live and redis.call('EXISTS', KEYS[k + 4 + 3 * i]) == 0 then chosen = i break end
      if live and fallback == nil then fallback = i end
    end
    chosen = chosen or fallback or 0
    local stream, queue = KEYS[k + 2 + 3 * chosen], ARGV[a + 8 + n + chosen]
    added[stream] = (added[stream] or 0) + 1
    if redis.call('XLEN', stream) + added[stream] > max_queued then
      return {{'full', tostring(index), queue}}
    end
    local plan = {status = 'queued', job_id = job_id, queue = queue, fingerprint = fingerprint,
                  job_key = job_key, idem_key = use_idem and idem_key, stream = stream,
                  message = ARGV[a + 8 + chosen], timeout_us = tonumber(ARGV[a + 1]),
                  model = ARGV[a + 2], lane = ARGV[a + 3], batch = ARGV[a + 4]}
    plans[index], planned[job_key] = plan, plan
    if use_idem then planned_key[idem_key] = job_id end
  end
  k, a = k + 2 + 3 * n, a + 8 + 2 * n
end
local replies = {}
for i, plan in ipairs(plans) do
  if plan.status == 'queued' then
    redis.call('HSET', plan.job_key, 'state', 'queued', 'model', plan.model, 'lane', plan.lane,
               'queue', plan.queue, 'enqueued_us', us(now), 'deadline_us', us(now + plan.timeout_us),
               'starts', '0', 'fingerprint', plan.fingerprint)
    if plan.batch ~= '' then redis.call('HSET', plan.job_key, 'batch', plan.batch) end
    redis.call('EXPIRE', plan.job_key, ttl)
    redis.call('XADD', plan.stream, '*', 'm', plan.message, 'r', '0')
    redis.call('SADD', KEYS[1], plan.queue)
    if plan.idem_key then redis.call('SET', plan.idem_key, plan.job_id, 'EX', ttl) end
  end
  replies[i] = {plan.status, plan.job_id, plan.queue}
end
return replies
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
    (OpenAI and Stripe refuse this too). The key is opaque, compared as given; a job id given
    without a key is its own key (`key` is then that id)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was used for another request (job {job_id!r})")
        self.key = key
        self.job_id = job_id


@dataclass(frozen=True)
class Receipt:
    job_id: str
    queue: str
    duplicate: bool  # an idempotency key matched an earlier job (another id): this is that job


def request_fingerprint(request: GenerationRequest) -> str:
    """sha256 of the request's canonical JSON without its idempotency key: equal for the same ask,
    however it was spelled (defaults included, keys sorted)."""
    body = request.model_dump(mode="json", exclude={"idempotency_key"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


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


@dataclass(frozen=True)
class Admission:
    """What the admission script needs besides the requests: the namespace and the deployment's bounds."""

    keys: Keys
    max_queued: int
    result_ttl_s: int
    default_timeout_s: float

    def call(
        self,
        requests: Sequence[GenerationRequest],
        job_ids: Sequence[str],
        route_for: Callable[[str], ModelRoute],
        batch_id: str | None,
    ) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments for the whole list (one call: all admitted or none)."""
        keys: list[str] = [self.keys.queues]
        args: list[Any] = [self.max_queued, self.result_ttl_s]
        for job_id, request in zip(job_ids, requests, strict=True):
            keys += [self.keys.job(job_id), self.keys.idempotency(request.idempotency_key or job_id)]
            messages, queues = [], []
            for backend in candidate_backends(route_for(request.model), request.backend):
                queue = queue_name(request.model, backend, request.lane)
                pool = pool_name(request.model, backend)
                keys += [self.keys.stream(queue), self.keys.pool(pool), self.keys.circuit(pool)]
                messages.append(build_message(job_id, request, queue, request.lane, batch_id=batch_id).encode())
                queues.append(queue)
            args += [
                job_id,
                int((request.timeout_s or self.default_timeout_s) * 1_000_000),
                request.model,
                request.lane.value,
                batch_id or "",
                "1" if request.idempotency_key else "0",
                request_fingerprint(request),
                len(queues),
                *messages,
                *queues,
            ]
        return keys, args


def parse_receipts(reply: Any, requests: Sequence[GenerationRequest], job_ids: Sequence[str]) -> list[Receipt]:
    """What the admission script answered: a receipt per request, or the refusal of the whole list.
    A job found under the very id asked for is no duplicate: it is this call's own job, admitted by
    an earlier send of the same script whose reply was lost (redis-py sends a command again)."""
    rows = [[_text(v) for v in row] for row in reply]
    status = rows[0][0] if rows else ""
    if status == "full":
        raise QueueFull(rows[0][2])
    if status == "conflict":
        request = requests[int(rows[0][1]) - 1]
        owner = rows[0][2]
        raise IdempotencyConflict(request.idempotency_key or owner, owner)
    return [
        Receipt(job_id=job_id, queue=queue, duplicate=status == "existing" and job_id != asked)
        for (status, job_id, queue), asked in zip(rows, job_ids, strict=True)
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
