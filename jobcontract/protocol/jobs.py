"""A job's own state changes: submit (admission of a whole list), start and finish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from jobcontract.admission import (
    Admission,
    Receipt,
    build_message,
    candidate_backends,
    message_request,
    parse_receipts,
)
from jobcontract.admission import request_fingerprint as request_fingerprint
from jobcontract.keys import DEFAULT_TENANT, PARTITION_INFIX, Keys, partition_of, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, GenerationResult, JobState
from jobcontract.prefix import prefix_fingerprint
from jobcontract.protocol.operation import Operation, text
from jobcontract.protocol.queue import partition_arg
from jobcontract.routes import ModelRoute


@dataclass(frozen=True)
class Submit(Operation[list[Receipt]]):
    """Admit the whole list or none of it (see jobcontract.admission for why). `tenant`: the gateway
    tenant the jobs belong to, written in the same script, so a job is never seen without its owner
    and the gateway needs no second round trip to name it."""

    SCRIPT: ClassVar[str] = "submit.lua"

    admission: Admission
    requests: Sequence[GenerationRequest]
    job_ids: Sequence[str]
    route_for: Callable[[str], ModelRoute]
    batch_id: str | None = None
    tenant: str | None = None  # the jobs' owner, written by the script, and carried in each message for metrics

    def keys(self) -> list[str]:
        return self._layout[0]

    def args(self) -> list[Any]:
        return self._layout[1]

    def parse(self, reply: Any) -> list[Receipt]:
        return parse_receipts(reply, self.requests, self.job_ids)

    @cached_property
    def _layout(self) -> tuple[list[str], list[Any]]:
        """Built once (each candidate's message is encoded): see submit.lua for the layout."""
        names, batch_id = self.admission.keys, self.batch_id
        keys: list[str] = [names.queues]
        head = [
            self.admission.max_queued,
            self.admission.result_ttl_s,
            self.tenant or "",
            PARTITION_INFIX,
            DEFAULT_TENANT,
        ]
        args: list[Any] = head
        for job_id, request in zip(self.job_ids, self.requests, strict=True):
            keys += [names.job(job_id), names.idempotency(request.idempotency_key or job_id)]
            messages, queues = [], []
            dumped = message_request(request)  # once, not once per candidate
            route = self.route_for(request.model)
            prefix = prefix_fingerprint(request, route.prefix_chars)
            member = partition_of(self.tenant, prefix)
            for backend in candidate_backends(route, request.backend):
                queue = queue_name(request.model, backend, request.lane)
                pool = pool_name(request.model, backend)
                keys += [names.partition(queue, member), names.pool(pool), names.circuit(pool)]
                keys += [names.partitions(queue), names.stream(queue)]
                message = build_message(
                    job_id,
                    request,
                    queue,
                    request.lane,
                    batch_id=batch_id,
                    tenant=self.tenant,
                    dumped=dumped,
                    prefix=prefix,
                )
                messages.append(message.encode())
                queues.append(queue)
            args += [
                job_id,
                int((request.timeout_s or self.admission.default_timeout_s) * 1_000_000),
                request.model,
                request.lane.value,
                batch_id or "",
                "1" if request.idempotency_key else "0",
                request_fingerprint(request),
                partition_arg(member),
                len(queues),
                *messages,
                *queues,
            ]
        return keys, args


@dataclass(frozen=True)
class StartTicket:
    """What a worker learns when it starts a job: the instants it needs, on the Redis clock."""

    enqueued_us: int
    deadline_us: int
    started_us: int

    @property
    def remaining_s(self) -> float:
        return (self.deadline_us - self.started_us) / 1_000_000


@dataclass(frozen=True)
class Start(Operation[StartTicket | JobState | None]):
    """Mark the job running. A ticket to run it; its terminal state if it is already done (a duplicate
    delivery); CANCELLED if a cancel was asked for; None if its record is gone."""

    SCRIPT: ClassVar[str] = "start.lua"

    names: Keys
    job_id: str
    worker: str
    backend: Backend
    queue: str

    def keys(self) -> list[str]:
        return [self.names.job(self.job_id)]

    def args(self) -> list[Any]:
        return [self.worker, self.backend.value, self.queue]

    def parse(self, reply: Any) -> StartTicket | JobState | None:
        fields = [text(v) for v in reply]
        if fields[0] == "run":
            return StartTicket(enqueued_us=int(fields[1]), deadline_us=int(fields[2]), started_us=int(fields[3]))
        if fields[0] == "missing":
            return None
        if fields[0] == "cancel":
            return JobState.CANCELLED
        return JobState(fields[0])


@dataclass(frozen=True)
class Finish(Operation[bool]):
    """Record a terminal result once (the first wins); False when the job was already finished."""

    SCRIPT: ClassVar[str] = "finish.lua"

    names: Keys
    result: GenerationResult
    batch_id: str | None
    ttl_s: int

    def keys(self) -> list[str]:
        job_id = self.result.job_id
        batch_done = self.names.batch_done(self.batch_id) if self.batch_id else self.names.job(job_id)
        return [self.names.job(job_id), self.names.events(job_id), batch_done]

    def args(self) -> list[Any]:
        return [
            self.result.state.value,
            self.result.model_dump_json(),
            self.ttl_s,
            self.result.job_id,
            "1" if self.batch_id else "0",
        ]

    def parse(self, reply: Any) -> bool:
        return bool(reply)
