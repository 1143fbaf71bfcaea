"""The Python client: submit jobs, wait for results, stream tokens, cancel, ask for status.

Every request is validated against the deployment's limits and routes before anything touches
Redis, so a malformed job raises `pydantic.ValidationError` and nothing is queued.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import redis

from jobcontract.connection import connect
from jobcontract.durability import NotReplicated
from jobcontract.jobs import IdempotencyConflict, JobStore, QueueFull, UnknownJob
from jobcontract.models import GenerationResult, JobState, JobStatus
from jobcontract.settings import GenqSettings
from producer.batch.book import BatchBook, BatchRecord
from producer.client_base import ClientBase, GenqUnavailable, RequestLike

__all__ = ["Client", "GenqUnavailable", "IdempotencyConflict", "NotReplicated", "QueueFull", "UnknownJob"]


class Client(ClientBase):
    def __init__(self, settings: GenqSettings | None = None, *, redis_client: redis.Redis | None = None) -> None:
        super().__init__(settings)
        self.redis = redis_client or connect(self.settings.redis_url)
        self.store = JobStore(
            self.redis,
            self.keys,
            result_ttl_s=self.settings.result_ttl_s,
            max_queued=self.settings.max_queued_jobs,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.redis.close()

    def submit(self, request: RequestLike, *, job_id: str | None = None) -> str:
        """Queue one job and return its id (the earlier job's id if its idempotency key, or the given
        job id, was seen with the same request; IdempotencyConflict if with another one)."""
        return self.submit_many([request], job_ids=None if job_id is None else [job_id])[0]

    def submit_many(
        self, requests: Sequence[RequestLike], *, batch_id: str | None = None, job_ids: Sequence[str] | None = None
    ) -> list[str]:
        """Validate every request first, then queue them all in one round trip, all or none: after
        QueueFull or IdempotencyConflict nothing of the list is queued, so it can be sent again."""
        checked, how = self.admission(requests, batch_id, job_ids)
        with self._reaching_redis():
            receipts = self.store.submit_many(checked, **how)
        return [r.job_id for r in receipts]

    def result(self, job_id: str, timeout: float | None = None) -> GenerationResult:
        """Wait for a job's result; raises TimeoutError if it has none after `timeout` seconds."""
        with self._reaching_redis():
            return self.store.wait(job_id, timeout)

    def results(self, job_ids: Sequence[str], timeout: float | None = None) -> list[GenerationResult]:
        with self._reaching_redis():
            done = self.store.wait_many(job_ids, timeout)
        return [done[j] for j in job_ids]

    def generate(self, request: RequestLike, timeout: float | None = None) -> GenerationResult:
        return self.result(self.submit(request), timeout)

    def stream(self, request: RequestLike, timeout: float | None = None) -> Iterator[str]:
        """Yield generated text as the worker produces it."""
        checked = self.validate(request)
        job_id = self.submit(checked.model_copy(update={"stream": True}))
        with self._reaching_redis():
            for event in self.store.tokens(job_id, timeout):
                yield event.text

    def status(self, job_id: str) -> JobStatus:
        with self._reaching_redis():
            return self.store.status(job_id)

    def cancel(self, job_id: str) -> JobState:
        """CANCELLED if it will never run; RUNNING if its worker was asked to abort it."""
        with self._reaching_redis():
            return self.store.cancel(job_id)

    # -- batches (the OpenAI Batch format; see producer/batch) ------------------------------------------
    def batch_book(self) -> BatchBook:
        return BatchBook(self.redis, self.store.keys, ttl_s=self.settings.result_ttl_s)

    def batch(
        self,
        input_path: str | Path,
        output_path: str | Path,
        *,
        errors_path: str | Path | None = None,
        skip_invalid: bool = False,
        batch_id: str | None = None,
        max_in_flight: int = 1000,
        on_progress: Callable[[Any], None] | None = None,
        on_start: Callable[[str, Any], None] | None = None,
    ) -> BatchRecord:
        """Run (or resume) a batch file to its end; the same call after an interruption finishes it
        without generating or writing any line twice. Raises BatchInvalid before queueing anything."""
        from producer.batch.file_run import run_file

        with self._reaching_redis():
            return run_file(
                self.store,
                self.batch_book(),
                self.settings,
                Path(input_path),
                Path(output_path),
                errors_path=None if errors_path is None else Path(errors_path),
                skip_invalid=skip_invalid,
                batch_id=batch_id,
                max_in_flight=max_in_flight,
                on_progress=on_progress,
                on_start=on_start,
            )

    def batch_status(self, batch_id: str) -> BatchRecord:
        with self._reaching_redis():
            return self.batch_book().get(batch_id)

    def batch_cancel(self, batch_id: str) -> BatchRecord:
        from producer.batch.control import cancel_batch

        with self._reaching_redis():
            return cancel_batch(self, batch_id)
