"""Cancelling a batch from anywhere: the batch stops submitting and every job it queued is cancelled."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from jobcontract.models import JobState
from producer.batch.book import BatchRecord, BatchStatus
from producer.batch.lease import died_here

if TYPE_CHECKING:
    from producer.client import Client

_TERMINAL = {s.value.encode() for s in JobState if s.terminal}


def cancel_batch(client: Client, batch_id: str, *, settle_s: float = 10.0) -> BatchRecord:
    """Mark the batch cancelling, cancel its unfinished jobs (queued ones never run, running ones are
    aborted), and when no runner is alive to finish the job, mark it cancelled once its jobs settled.
    The output of what finished stays readable: the next `batch run` (or gateway) writes it out."""
    book = client.batch_book()
    status = book.advance(batch_id, BatchStatus.CANCELLING)
    record = book.get(batch_id)
    if status is None or status.terminal:
        return record
    # A gateway batch is finished by a gateway (its own, or one that adopts it): it writes the files.
    finish_here = record.origin != "gateway"
    cancel_jobs(client, batch_id)
    deadline = time.monotonic() + settle_s
    while True:
        record = book.get(batch_id)
        holder = book.lease_holder(batch_id) if record.runner_alive else None
        alive = holder is not None and not died_here(holder)
        if alive or record.status.terminal or not finish_here:
            return record
        if record.finished >= record.submitted:
            book.advance(batch_id, BatchStatus.CANCELLED)
            return book.get(batch_id)
        if time.monotonic() > deadline:
            return record
        time.sleep(0.1)


def cancel_jobs(client: Client, batch_id: str) -> None:
    """Cancel every job of the batch that has not finished (queued ones never run, running ones stop)."""
    book, store = client.batch_book(), client.store
    for job_ids in book.job_ids(batch_id):
        pipe = client.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(store.keys.job(job_id), "state")
        for job_id, state in zip(job_ids, pipe.execute(), strict=True):
            if state is not None and state not in _TERMINAL:
                client.cancel(job_id)
