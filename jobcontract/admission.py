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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq

from jobcontract import scripts
from jobcontract.keys import DEFAULT_TENANT as DEFAULT_TENANT  # whose a job is when nobody says
from jobcontract.keys import Keys, actor_name
from jobcontract.models import Backend, GenerationRequest, Lane
from jobcontract.prefix import PREFIX_OPTION
from jobcontract.protocol.placement import WorkerModels
from jobcontract.routes import ModelRoute

# What EVAL runs for an admission (jobcontract/protocol/submit.lua, includes expanded); the operation
# that builds its keys and arguments is jobcontract.protocol.jobs.Submit.
SUBMIT_SCRIPT = scripts.source("jobcontract.protocol", "submit.lua")


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


class ModelTooLarge(Exception):
    """No live worker serving the model has a memory budget it fits in: queued, it would wait for a
    load that never comes (or kill a server trying). Refused before anything is written."""

    def __init__(self, model: str, size_bytes: int, largest_budget_bytes: int) -> None:
        super().__init__(
            f"model {model!r} needs {size_bytes / GIB:.2f} GiB ({size_bytes} bytes), more than the largest memory "
            f"budget of any live worker serving it: {largest_budget_bytes / GIB:.2f} GiB ({largest_budget_bytes} bytes)"
        )
        self.model = model
        self.size_bytes = size_bytes
        self.largest_budget_bytes = largest_budget_bytes


GIB = 1024**3


def refuse_too_large(models: Iterable[str], fleet: Sequence[WorkerModels]) -> None:
    """Raise ModelTooLarge for the first model that live workers serve but none can hold. A model no
    published worker serves passes (a worker may come; today's no-worker handling applies), and so
    does one served by a single-model worker (no budget: its model is always loaded)."""
    for model in dict.fromkeys(models):
        serving = [w for w in fleet if model in w.serves]
        if not serving or any(w.fits(model) for w in serving):
            continue
        size = min(w.sizes.get(model, 0) for w in serving)
        raise ModelTooLarge(model, size, max(w.budget_bytes or 0 for w in serving))


@dataclass(frozen=True)
class Receipt:
    job_id: str
    queue: str
    duplicate: bool  # an idempotency key matched an earlier job (another id): this is that job


# Request fields that only steer admission and placement: no part of the ask (so not of its
# fingerprint), and not sent to workers, which have no use for them (so a worker from before one was
# added still runs the job).
PLACEMENT_ONLY = frozenset({"prompt_cache_key"})


def request_fingerprint(request: GenerationRequest) -> str:
    """sha256 of the request's canonical JSON without its idempotency key (nor PLACEMENT_ONLY
    fields): equal for the same ask, however it was spelled (defaults included, keys sorted)."""
    body = request.model_dump(mode="json", exclude={"idempotency_key", *PLACEMENT_ONLY})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def candidate_backends(route: ModelRoute, preferred: Backend | None) -> list[Backend]:
    order = list(route.order)
    if preferred is not None and preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    return order


def message_request(request: GenerationRequest) -> dict[str, Any]:
    """The request as a job's message carries it to a worker: non-default fields, none PLACEMENT_ONLY."""
    return request.model_dump(mode="json", exclude_defaults=True, exclude=set(PLACEMENT_ONLY))


def build_message(
    job_id: str,
    request: GenerationRequest,
    queue: str,
    lane: Lane,
    *,
    attempts: Sequence[dict[str, Any]] = (),
    batch_id: str | None = None,
    tenant: str | None = None,
    dumped: dict[str, Any] | None = None,
    prefix: str | None = None,
) -> dramatiq.Message[Any]:
    """The dramatiq message a worker's actor receives: one attempt's worth of the job. `tenant` (the
    gateway's caller) labels the worker's metrics; ownership checks read the job's record. `dumped`:
    the request as this function would dump it, when the caller already has it (one per candidate
    queue of an admission: the same dict for each). `prefix`: the request's prefix fingerprint
    (jobcontract.prefix), in the message's options under PREFIX_OPTION, where placement reads it
    without parsing the request; options survive retries, reroutes, rescues and replays (each copies
    or rebuilds the message with its options)."""
    kwargs: dict[str, Any] = {
        "request": dumped if dumped is not None else message_request(request),
        "attempts": list(attempts),
    }
    if batch_id is not None:
        kwargs["batch_id"] = batch_id
    if tenant is not None:
        kwargs["tenant"] = tenant
    return dramatiq.Message(
        queue_name=queue,
        actor_name=actor_name(lane),
        args=(job_id,),
        kwargs=kwargs,
        options={} if prefix is None else {PREFIX_OPTION: prefix},
        message_id=job_id,
    )


@dataclass(frozen=True)
class Admission:
    """What the admission script needs besides the requests: the namespace and the deployment's bounds
    (the script's keys and arguments are built by jobcontract.protocol.jobs.Submit)."""

    keys: Keys
    max_queued: int
    result_ttl_s: int
    default_timeout_s: float


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
