"""The runners behind `/v1/batches`: a gateway runs its batches in threads and adopts any batch whose
runner died (its lease lapsed), reading input from /v1/files and appending output and error files."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from jobcontract.keys import Keys
from producer.batch.book import BatchBook, BatchStatus
from producer.batch.control import cancel_jobs
from producer.batch.lease import LEASE_TTL_S, BatchBusy
from producer.batch.progress import Progress
from producer.batch.runner import BatchRunner, InputChanged
from producer.batch.sinks import Counts, RedisSink
from producer.batch.sources import InputGone, LineSource, redis_source
from producer.batch.validation import BatchModelTooLarge, validate
from producer.client import Client
from producer.gateway.api_keys import DEFAULT_TENANT
from producer.gateway.files import FileStore

log = logging.getLogger(__name__)

VALIDATION_LEASE_S = 120.0
KEEP_INPUT_EVERY_S = 10.0  # how often a running batch renews its input file's TTL


class TooManyLines(Exception):
    pass


def at_most(source: LineSource, max_lines: int) -> LineSource:
    """The source, stopping with TooManyLines past `max_lines` lines, so an oversized file is refused
    without reading it all."""

    def lines() -> Iterator[tuple[int, bytes]]:
        for number, raw in source():
            if number > max_lines:
                raise TooManyLines(f"the input file has more than {max_lines} lines, the limit of one batch")
            yield number, raw

    return lines


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-errors"


class BatchSupervisor:
    """Runs this gateway's batches in threads and adopts any whose runner died."""

    def __init__(self, client: Client, files: FileStore, *, max_lines: int, adopt_every_s: float = 2.0) -> None:
        self.client = client
        self.files = files
        self.max_lines = max_lines
        self.book: BatchBook = client.batch_book()
        self.keys: Keys = client.store.keys
        self.adopt_every_s = adopt_every_s
        self.stopping = threading.Event()
        self.running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._adopter = threading.Thread(target=self._adopt_loop, name="batch-adopter", daemon=True)

    def start(self) -> None:
        self._adopter.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping.set()
        for thread in list(self.running.values()):
            thread.join(timeout_s)

    def launch(self, batch_id: str) -> None:
        with self._lock:
            current = self.running.get(batch_id)
            if current is not None and current.is_alive():
                return
            thread = threading.Thread(target=self._run, args=(batch_id,), name=f"batch-{batch_id}", daemon=True)
            self.running[batch_id] = thread
            thread.start()

    def _adopt_loop(self) -> None:
        while True:
            try:
                for batch_id in self.book.active():
                    if self.book.lease_holder(batch_id) is None:
                        self.launch(batch_id)
            except Exception as error:  # Redis away for a moment: try again next round
                log.warning("batch adoption round failed: %s", error)
            if self.stopping.wait(self.adopt_every_s):
                return

    def _run(self, batch_id: str) -> None:
        owner = f"gateway:{uuid.uuid4().hex[:12]}"
        # Long enough to validate a large file; the runner then renews it every pass.
        if not self.book.take_lease(batch_id, owner, VALIDATION_LEASE_S):
            return
        try:
            record = self.book.get(batch_id)
            if record.status.terminal:
                self.book.advance(batch_id, record.status)  # drops it from the active set
                return
            # The input must outlive the batch: renewed now and every few seconds while it runs, and a
            # delete through the API is refused (files.py); should it vanish all the same, the batch fails.
            self.files.touch(record.input)
            source = redis_source(self.client.redis, self.keys.file_content(record.input))
            total = record.total
            if record.status is BatchStatus.VALIDATING:
                try:
                    validation = validate(
                        at_most(source, self.max_lines), self.client.settings.limits, endpoint=record.endpoint
                    )
                except (InputGone, InputChanged) as error:
                    self._input_lost(batch_id, record.input, error)
                    return
                except TooManyLines as error:
                    line = {"code": "too_many_lines", "message": str(error), "param": None, "line": self.max_lines + 1}
                    self.book.update(batch_id, errors=[line])
                    self.book.advance(batch_id, BatchStatus.FAILED)
                    return
                if validation.invalid:
                    errors = [
                        {"code": "invalid_request", "message": e.message, "param": None, "line": e.number}
                        for e in validation.errors
                    ]
                    self.book.update(batch_id, errors=errors, invalid=validation.invalid, total=validation.valid)
                    self.book.advance(batch_id, BatchStatus.FAILED)
                    return
                try:
                    validation.refuse_too_large(self.client.store.check_sizes)
                except BatchModelTooLarge as error:
                    line = {
                        "code": "model_too_large",
                        "message": str(error.refused),
                        "param": "model",
                        "line": error.line,
                    }
                    self.book.update(batch_id, errors=[line], total=validation.valid)
                    self.book.advance(batch_id, BatchStatus.FAILED)
                    return
                total = validation.valid
                self.book.update(batch_id, total=total)
            sink = RedisSink(
                self.client.redis,
                self.keys,
                batch_id,
                output_file_id(batch_id),
                error_file_id(batch_id),
                self.client.settings.result_ttl_s,
            )

            tenant = record.tenant or DEFAULT_TENANT

            def finalize(counts: Counts) -> None:
                self.files.record(output_file_id(batch_id), f"{batch_id}_output.jsonl", "batch_output", tenant)
                fields: dict[str, Any] = {"output_file_id": output_file_id(batch_id)}
                if counts.failed or counts.cancelled or counts.invalid:
                    self.files.record(error_file_id(batch_id), f"{batch_id}_errors.jsonl", "batch_output", tenant)
                    fields["error_file_id"] = error_file_id(batch_id)
                self.book.update(batch_id, **fields)

            runner = BatchRunner(
                self.client.store,
                self.book,
                self.client.settings,
                batch_id,
                source,
                sink,
                total=total,
                endpoint=record.endpoint,
                on_finalize=finalize,
                stop=self.stopping,
                owner=owner,
                on_progress=self._keeper(record.input, record.tenant),
                tenant=tenant,
            )
            try:
                final = runner.run()
            except (InputGone, InputChanged) as error:
                self._input_lost(batch_id, record.input, error)
                return
            if final.status is BatchStatus.CANCELLED:
                finalize(Counts(failed=final.failed, cancelled=final.cancelled, completed=final.completed))
        except BatchBusy:
            return
        except Exception:
            log.exception("batch %s stopped; a gateway adopts it again within %.0fs", batch_id, LEASE_TTL_S)
        finally:
            self.book.release_lease(batch_id, owner)

    def _keeper(self, file_id: str, tenant: str | None) -> Callable[[Progress], None]:
        """A progress callback (called on every pass of the runner) renewing the input's TTL and the
        tenant's batch listing."""
        renewed = time.monotonic()

        def keep(_progress: Progress) -> None:
            nonlocal renewed
            if time.monotonic() - renewed >= KEEP_INPUT_EVERY_S:
                self.files.touch(file_id)
                self.book.keep_listed(tenant)
                renewed = time.monotonic()

        return keep

    def _input_lost(self, batch_id: str, file_id: str, error: Exception) -> None:
        """Fail the batch with a clear message and cancel what it queued: never `completed` short."""
        gone = isinstance(error, InputGone)
        message = (
            f"the input file {file_id!r} "
            + ("was deleted or expired while the batch ran" if gone else "changed while the batch ran")
            + f" ({error}); the batch stopped and its unfinished requests were cancelled"
        )
        code = "input_file_missing" if gone else "input_file_changed"
        log.warning("batch %s failed: %s", batch_id, message)
        self.book.update(batch_id, errors=[{"code": code, "message": message, "param": "input_file_id", "line": None}])
        self.book.advance(batch_id, BatchStatus.FAILED)
        cancel_jobs(self.client, batch_id)
