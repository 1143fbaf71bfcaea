"""What one attempt leaves behind when it does not succeed: the failure the rerouting middleware
decides on (AttemptFailed), or the result of a job cancelled before or while it ran."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jobcontract import results
from jobcontract.jobs import JobStore, UnknownJob
from jobcontract.models import Attempt, Backend, GenerationRequest, GenerationResult
from jobcontract.outage import ride_out


class AttemptFailed(Exception):
    """An attempt that did not produce a result; `attempt` is recorded in the job's history."""

    def __init__(self, attempt: Attempt, *, retryable: bool, deadline_us: int, enqueued_us: int) -> None:
        super().__init__(attempt.error or attempt.outcome.value)
        self.attempt = attempt
        self.retryable = retryable
        self.deadline_us = deadline_us
        self.enqueued_us = enqueued_us


def cancelled_result(
    store: JobStore,
    job_id: str,
    request: GenerationRequest,
    history: list[dict[str, Any]],
    attempt: Attempt | None,
    *,
    backend: Backend,
    worker: str,
    enqueued_at: datetime | None,
) -> GenerationResult:
    """The cancelled result, with the attempt that was cut short (None: cancelled before it ran).
    Without a start ticket the enqueue time comes from the job's record, never from `now`."""
    now = store.now()
    attempts = [Attempt.model_validate(a) for a in history]
    if attempt is not None:
        attempts.append(attempt)
    return results.cancelled(
        job_id,
        request.model,
        enqueued_at=enqueued_at or _enqueued_at(store, job_id, now),
        started_at=attempt.started_at if attempt is not None else None,
        finished_at=now,
        backend=backend,
        worker=worker,
        attempts=attempts,
        metadata=request.metadata,
    )


def _enqueued_at(store: JobStore, job_id: str, now: datetime) -> datetime:
    try:
        return ride_out(lambda: store.status(job_id), store.outage_patience_s).enqueued_at
    except UnknownJob:
        return now
