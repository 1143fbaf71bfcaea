"""The batch loop: validate every line, then submit in a bounded window and write results as they finish.

Submission and writing are decoupled through the batch's stream of finished jobs in Redis
(`keys.batch_done`): workers append to it, this loop reads it from its checkpoint. Anything that
stops the loop (Ctrl-C, a crash, a gateway restart) loses nothing: jobs already queued keep running,
their results wait in the stream, and the next run resubmits nothing (job ids and idempotency keys
are fixed by batch id and custom_id) and writes each finished line once (see sinks.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

from jobcontract.connection import stream_reply
from jobcontract.durability import NotReplicated
from jobcontract.jobs import JobStore, ModelTooLarge, QueueFull
from jobcontract.models import GenerationResult, JobState
from jobcontract.outage import OUTAGE_ERRORS, OutagePolicy
from jobcontract.settings import GenqSettings
from producer.batch.book import BatchBook, BatchRecord, BatchStatus
from producer.batch.finished import mark_written, to_write
from producer.batch.lease import LEASE_TTL_S, BatchBusy, died_here
from producer.batch.lines import CUSTOM_ID, BatchLine, InvalidLine, checked_lines, invalid_line, output_line
from producer.batch.progress import ProgressCallback, measure
from producer.batch.sinks import Checkpoint, Counts, Sink
from producer.batch.sources import LineSource
from producer.client_base import ReachingRedis

# GenqUnavailable is a builtin ConnectionError; NotReplicated: admitted while no replica confirms.
_OUTAGES = (*OUTAGE_ERRORS, ConnectionError, NotReplicated)
log = logging.getLogger(__name__)


def batch_outage_policy(settings: GenqSettings) -> OutagePolicy:
    """The deployment's outage policy (GENQ_REDIS_OUTAGE_PATIENCE_S) over what a batch run meets in
    an outage: one that lasts longer ends the run (it can be rerun and resumes)."""
    return replace(settings.outage_policy, errors=_OUTAGES)


class InputChanged(RuntimeError):
    """The input ended before every line counted at validation was queued: it shrank or vanished
    while the batch ran, so the batch cannot be completed honestly."""


class BatchRunner:
    """Runs one batch whose record exists, until it is completed or cancelled and fully written."""

    def __init__(
        self,
        store: JobStore,
        book: BatchBook,
        settings: GenqSettings,
        batch_id: str,
        source: LineSource,
        sink: Sink,
        *,
        total: int,
        endpoint: str | None = None,
        max_in_flight: int = 1000,
        chunk: int = 256,
        owner: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_finalize: Callable[[Counts], None] | None = None,
        stop: threading.Event | None = None,
        tenant: str | None = None,
    ) -> None:
        self.store = store
        self.tenant = tenant  # a gateway batch's: its jobs' messages carry it for the worker's metrics
        self.book = book
        self.settings = settings
        self.outage = batch_outage_policy(settings)
        self.batch_id = batch_id
        self.source = source
        self.sink = sink
        self.total = total
        self.endpoint = endpoint
        self.max_in_flight = max(1, max_in_flight)
        self.chunk = max(1, chunk)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_progress = on_progress
        self.on_finalize = on_finalize
        self.stop = stop or threading.Event()  # set: leave the loop (queued jobs run on; a rerun resumes)
        self.done_key = store.keys.batch_done(batch_id)

    def run(self, *, wait_for_lease_s: float = 0.0) -> BatchRecord:
        """Run to the end. A lease held by a process that died on this host is broken at once; one held
        elsewhere is waited for up to `wait_for_lease_s` (it lapses LEASE_TTL_S after its holder died)."""
        deadline = time.monotonic() + wait_for_lease_s
        while not self.outage.ride_out(lambda: self.book.take_lease(self.batch_id, self.owner, LEASE_TTL_S)):
            holder = self.outage.ride_out(lambda: self.book.lease_holder(self.batch_id))
            if holder is not None and died_here(holder):
                self.book.break_lease(self.batch_id, holder)
            elif time.monotonic() > deadline:
                raise BatchBusy(f"batch {self.batch_id} is being run by another live process ({holder})")
            else:
                time.sleep(0.2)
        try:
            # A Redis restart or failover does not end the run: the loop starts again from the book
            # and the sink's checkpoint (resubmitting is idempotent) and renews the lease it holds.
            self.outage.ride_out(self._loop)
        finally:
            with contextlib.suppress(*_OUTAGES):  # else it lapses LEASE_TTL_S later
                self.book.release_lease(self.batch_id, self.owner)
        return self.outage.ride_out(lambda: self.book.get(self.batch_id))

    def _loop(self) -> None:
        record = self.book.get(self.batch_id)
        if record.status is BatchStatus.VALIDATING:
            self.book.advance(self.batch_id, BatchStatus.IN_PROGRESS)
        checkpoint = self.sink.checkpoint
        submitted, submitted_line = record.submitted, self.book.submitted_line(self.batch_id)
        lines = self._lines(submitted_line, checkpoint.invalid_through)
        held: list[BatchLine] = []  # a chunk refused by a full queue, tried again later
        window = self.chunk  # how many of `held` one admission asks for (a list is admitted whole or not)
        invalid: list[InvalidLine] = []
        exhausted, retry_at = False, 0.0
        started, start_counts = time.monotonic(), replace(checkpoint.counts)
        while not self.stop.is_set():
            if not self.book.take_lease(self.batch_id, self.owner, LEASE_TTL_S):
                raise BatchBusy(f"lost the lease of batch {self.batch_id} to another process")
            status = self.book.get_status(self.batch_id)
            stopping = status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
            waiting = True
            if not stopping and time.monotonic() >= retry_at:
                while not exhausted or held:
                    room = self.max_in_flight - (submitted - checkpoint.counts.written)
                    if room <= 0:
                        break
                    if not held:
                        held, exhausted = self._take(lines, min(room, self.chunk), invalid)
                        if not held:
                            continue
                    taken = held[:window]
                    try:
                        self._submit(taken)
                    except (QueueFull, ModelTooLarge) as refused:
                        # Nothing of `taken` got in: try fewer, and wait once one is refused. A model
                        # too large was checked for the whole file before the run (validation): the
                        # live workers changed since, and its line waits for one that can hold it.
                        if len(taken) == 1:
                            if isinstance(refused, ModelTooLarge):
                                log.warning("batch %s, line %d waits: %s", self.batch_id, taken[0].number, refused)
                            retry_at = time.monotonic() + (0.5 if isinstance(refused, QueueFull) else 5.0)
                            break
                        window = len(taken) // 2
                        continue
                    jobs = {line.for_batch(self.batch_id)[0]: line.custom_id for line in taken}
                    submitted = self.book.record_submitted(self.batch_id, jobs, taken[-1].number)
                    held, window = held[len(taken) :], min(self.chunk, window * 2)
                    waiting = False
            checkpoint, read = self._collect(checkpoint, invalid, block_ms=None if not waiting else 500)
            invalid = []
            self._report(status, submitted, checkpoint.counts, start_counts, started)
            if checkpoint.counts.written < submitted and not (status.terminal and read == 0):
                continue
            if stopping:
                # Its output and error files are recorded before the status says cancelled: a caller
                # who sees `cancelled` finds them (it found none, now and then, before).
                if self.on_finalize is not None:
                    self.on_finalize(checkpoint.counts)
                self.book.advance(self.batch_id, BatchStatus.CANCELLED)
                return
            if status.terminal:
                return  # a rerun of a finished batch: its output is now complete
            # (when cancelled while finalizing, the next pass finishes as cancelled)
            if exhausted and not held and submitted < self.total:
                raise InputChanged(
                    f"the input ended after {submitted} of its {self.total} valid lines were queued "
                    "(it changed or vanished while the batch ran)"
                )
            if (
                exhausted
                and not held
                and self.book.advance(self.batch_id, BatchStatus.FINALIZING) is BatchStatus.FINALIZING
            ):
                if self.on_finalize is not None:
                    self.on_finalize(checkpoint.counts)
                self.book.advance(self.batch_id, BatchStatus.COMPLETED)
                return

    def _lines(self, submitted_line: int, invalid_through: int) -> Iterator[BatchLine | InvalidLine]:
        """Lines not yet submitted, and invalid lines not yet written out, in file order. Lines before
        the checkpoint are read too: a later line repeating their custom_id is invalid, as in validate."""
        limits = self.settings.limits
        for number, _raw, parsed in checked_lines(self.source, limits, endpoint=self.endpoint):
            if parsed is None:
                continue
            if number > (submitted_line if isinstance(parsed, BatchLine) else invalid_through):
                yield parsed

    def _take(
        self, lines: Iterator[BatchLine | InvalidLine], count: int, invalid: list[InvalidLine]
    ) -> tuple[list[BatchLine], bool]:
        taken: list[BatchLine] = []
        for line in lines:
            if isinstance(line, InvalidLine):
                invalid.append(line)
                continue
            taken.append(line)
            if len(taken) >= count:
                return taken, False
        return taken, True

    def _submit(self, lines: list[BatchLine]) -> None:
        pairs = [line.for_batch(self.batch_id) for line in lines]
        with ReachingRedis(self.settings.redis_url):
            self.store.submit_many(
                [request for _, request in pairs],
                route_for=self.settings.routes.get,
                default_timeout_s=self.settings.default_timeout_s,
                batch_id=self.batch_id,
                job_ids=[job_id for job_id, _ in pairs],
                tenant=self.tenant,
            )

    def _collect(
        self, checkpoint: Checkpoint, invalid: list[InvalidLine], *, block_ms: int | None
    ) -> tuple[Checkpoint, int]:
        """Write out what finished since the checkpoint; returns the new checkpoint and how many jobs."""
        reply = stream_reply(
            self.store.client.xread({self.done_key: checkpoint.cursor}, count=self.chunk, block=block_ms)
        )
        entries = [entry for _stream, batch in reply for entry in batch]
        if not entries and not invalid:
            return checkpoint, 0
        due = to_write(self.store, [fields[b"job"].decode() for _id, fields in entries])
        counts = replace(checkpoint.counts)
        output: list[str] = []
        errors: list[str] = []
        # A job cancelled before it ran has a result without the request's metadata: ask the batch.
        unnamed = [f.job_id for f in due if f.result is None or CUSTOM_ID not in f.result.metadata]
        names = dict(zip(unnamed, self.book.custom_ids(self.batch_id, unnamed), strict=True))
        for finished in due:
            is_error, line = output_line(finished.job_id, finished.result, custom_id=names.get(finished.job_id))
            (errors if is_error else output).append(line)
            _count(counts, finished.result)
        for bad in invalid:
            errors.append(invalid_line(bad))
            counts.invalid += 1
        updated = Checkpoint(
            cursor=entries[-1][0].decode() if entries else checkpoint.cursor,
            invalid_through=max([checkpoint.invalid_through, *(bad.number for bad in invalid)]),
            counts=counts,
        )
        self.sink.commit(output, errors, updated)
        mark_written(self.store.client, self.store.keys, [f.job_id for f in due])
        self.book.update(
            self.batch_id,
            completed=counts.completed,
            failed=counts.failed,
            cancelled=counts.cancelled,
            invalid=counts.invalid,
            tokens=counts.tokens,
        )
        return updated, len(entries)

    def _report(self, status: BatchStatus, submitted: int, counts: Counts, start: Counts, started: float) -> None:
        if self.on_progress is not None:
            self.on_progress(measure(self.batch_id, status, self.total, submitted, counts, start, started))


def _count(counts: Counts, result: GenerationResult | None) -> None:
    if result is not None and result.state is JobState.SUCCEEDED:
        counts.completed += 1
        counts.tokens += result.usage.completion_tokens
    elif result is not None and result.state is JobState.CANCELLED:
        counts.cancelled += 1
    else:
        counts.failed += 1
