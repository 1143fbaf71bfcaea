"""A batch from a file on disk (the CLI and Client.batch): validated, recorded, run to its end."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from jobcontract.jobs import JobStore
from jobcontract.settings import GenqSettings
from producer.batch.book import BatchBook, BatchRecord, BatchStatus
from producer.batch.lease import LEASE_TTL_S
from producer.batch.progress import ProgressCallback
from producer.batch.runner import BatchRunner, batch_outage_policy
from producer.batch.sinks import FileSink
from producer.batch.sources import file_source
from producer.batch.validation import BatchInvalid, Validation, validate


def file_batch_id(path: Path, digest: str) -> str:
    """Fixed by the file's place and content: the same command run again resumes the same batch."""
    return "batch_" + hashlib.sha256(f"{path.resolve()}\0{digest}".encode()).hexdigest()[:24]


def run_file(
    store: JobStore,
    book: BatchBook,
    settings: GenqSettings,
    input_path: Path,
    output_path: Path,
    *,
    errors_path: Path | None = None,
    skip_invalid: bool = False,
    batch_id: str | None = None,
    max_in_flight: int = 1000,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[str, Validation], None] | None = None,
) -> BatchRecord:
    source = file_source(input_path)
    validation = validate(source, settings.limits)
    if validation.invalid and not skip_invalid:
        raise BatchInvalid(validation)
    outage = batch_outage_policy(settings)
    # Its first Redis call: a run started during a failover or a restart waits it out like the rest.
    outage.ride_out(lambda: validation.refuse_too_large(store.check_sizes))
    batch_id = batch_id or file_batch_id(input_path, validation.digest)
    outage.ride_out(
        lambda: book.create(
            batch_id,
            status=BatchStatus.IN_PROGRESS,
            origin="cli",
            input=str(input_path.resolve()),
            total=validation.valid,
            invalid=validation.invalid,
        )
    )
    if on_start is not None:
        on_start(batch_id, validation)
    sink = FileSink(batch_id, output_path, errors_path or default_errors_path(output_path))
    try:
        runner = BatchRunner(
            store,
            book,
            settings,
            batch_id,
            source,
            sink,
            total=validation.valid,
            max_in_flight=max_in_flight,
            on_progress=on_progress,
        )
        return runner.run(wait_for_lease_s=LEASE_TTL_S + 1)
    finally:
        sink.close()


def default_errors_path(output: Path) -> Path:
    stem = output.name.removesuffix(".jsonl")
    return output.with_name(f"{stem}.errors.jsonl")
