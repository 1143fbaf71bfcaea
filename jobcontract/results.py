"""The one place a job's final result is built: succeeded, failed, cancelled.

A result is read by callers, the gateway, batch output and metrics, so its fields must mean the
same whoever wrote it (a worker's run, the rerouting middleware giving up, a cancel before the job
ran). The broker's Lua `fail_job` (jobcontract.jobs.FAIL_JOB_LUA) is the one writer outside Python:
it fills the same fields as `failed(..., replayable=True)` with type = the dead-letter reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from jobcontract.models import (
    Attempt,
    Backend,
    GenerationResult,
    JobError,
    JobState,
    Timings,
    Usage,
)


def succeeded(
    job_id: str,
    model: str,
    *,
    text: str,
    finish_reason: Literal["stop", "length"],
    usage: Usage,
    backend: Backend,
    worker: str,
    attempts: Sequence[Attempt],
    timings: Timings,
    metadata: dict[str, str],
) -> GenerationResult:
    return GenerationResult(
        job_id=job_id,
        model=model,
        state=JobState.SUCCEEDED,
        text=text,
        finish_reason=finish_reason,
        usage=usage,
        backend=backend,
        worker=worker,
        attempts=list(attempts),
        timings=timings,
        metadata=metadata,
    )


def failed(
    job_id: str,
    model: str,
    *,
    error_type: str,
    message: str,
    replayable: bool,
    enqueued_at: datetime,
    finished_at: datetime,
    started_at: datetime | None = None,
    backend: Backend | None = None,
    worker: str | None = None,
    attempts: Sequence[Attempt] = (),
    metadata: dict[str, str] | None = None,
) -> GenerationResult:
    """`replayable`: the job was filed under dead letters and can be replayed from there, so its
    error is marked retryable; a hopeless request (refused, out of time) is not."""
    return GenerationResult(
        job_id=job_id,
        model=model,
        state=JobState.FAILED,
        finish_reason="error",
        backend=backend,
        worker=worker,
        attempts=list(attempts),
        timings=Timings(enqueued_at=enqueued_at, started_at=started_at, finished_at=finished_at),
        error=JobError(type=error_type, message=message, retryable=replayable),
        metadata=metadata or {},
    )


def cancelled(
    job_id: str,
    model: str,
    *,
    enqueued_at: datetime,
    finished_at: datetime,
    started_at: datetime | None = None,
    backend: Backend | None = None,
    worker: str | None = None,
    attempts: Sequence[Attempt] = (),
    metadata: dict[str, str] | None = None,
) -> GenerationResult:
    """A job that ran (started_at set) was cancelled by request; one that never ran, before it ran."""
    message = "cancelled by request" if started_at is not None or worker is not None else "cancelled before it ran"
    return GenerationResult(
        job_id=job_id,
        model=model,
        state=JobState.CANCELLED,
        finish_reason="cancelled",
        backend=backend,
        worker=worker,
        attempts=list(attempts),
        timings=Timings(enqueued_at=enqueued_at, started_at=started_at, finished_at=finished_at),
        error=JobError(type="cancelled", message=message),
        metadata=metadata or {},
    )
