"""`genq batch run | status | cancel`: OpenAI Batch files through the queue, resumable."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.batch.progress import Progress
    from producer.batch.validation import Validation


def register(sub: Any) -> None:
    batch = sub.add_parser("batch", help="run OpenAI Batch files (JSONL) through the queue")
    actions = batch.add_subparsers(dest="batch_command", required=True)
    run = actions.add_parser(
        "run",
        help="validate, queue and collect a batch file; run it again after an interruption to finish it",
    )
    run.add_argument("input", type=Path, help="OpenAI Batch input JSONL")
    run.add_argument("-o", "--output", type=Path, required=True, help="OpenAI Batch output JSONL")
    run.add_argument("--errors", type=Path, help="failed lines (default: OUTPUT with .errors.jsonl)")
    run.add_argument("--skip-invalid", action="store_true", help="queue the valid lines even if some are invalid")
    run.add_argument("--batch-id", help="name the batch instead of deriving it from the file's path and content")
    run.add_argument("--max-in-flight", type=int, default=1000, help="lines queued ahead of those finished")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.set_defaults(run=_run)
    for action, text in (("status", "counts and status of a batch"), ("cancel", "stop a batch and cancel its jobs")):
        command = actions.add_parser(action, help=text)
        command.add_argument("batch_id")
        command.set_defaults(run=_status if action == "status" else _cancel)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from producer.batch.book import BatchStatus
    from producer.batch.file_run import default_errors_path
    from producer.batch.validation import BatchInvalid, BatchModelTooLarge
    from producer.client import Client

    # A service manager's SIGTERM stops the run as Ctrl-C does: the lease is released for the rerun.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console(stderr=True)
    display = _ProgressDisplay(console, enabled=not args.no_progress)
    errors_path = args.errors or default_errors_path(args.output)
    with Client() as client:
        try:
            record = client.batch(
                args.input,
                args.output,
                errors_path=errors_path,
                skip_invalid=args.skip_invalid,
                batch_id=args.batch_id,
                max_in_flight=args.max_in_flight,
                on_progress=display.update,
                on_start=display.start,
            )
        except (BatchInvalid, BatchModelTooLarge) as error:
            print(f"genq: {args.input}: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            display.stop()
            print(
                "genq: interrupted; queued lines keep running. Run the same command again to finish the batch.",
                file=sys.stderr,
            )
            return 130
        finally:
            display.stop()
    written = record.completed + record.failed + record.cancelled
    print(
        f"batch {record.id}: {record.status.value}; {record.completed} succeeded, {record.failed} failed, "
        f"{record.cancelled} cancelled, {record.invalid} invalid, of {record.total + record.invalid} lines "
        f"({written} written); output {args.output}, errors {errors_path}",
        file=sys.stderr,
    )
    return 0 if record.status is BatchStatus.COMPLETED else 1


def _status(args: argparse.Namespace) -> int:
    from producer.client import Client

    with Client() as client:
        record = client.batch_status(args.batch_id)
    print(json.dumps({**record.model_dump(mode="json"), "in_flight": record.in_flight}, indent=2))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from producer.client import Client

    with Client() as client:
        record = client.batch_cancel(args.batch_id)
    print(json.dumps({"id": record.id, "status": record.status.value, "in_flight": record.in_flight}))
    return 0


class _ProgressDisplay:
    """A live bar: lines done of total, failed, in flight, tokens/s and the time left."""

    def __init__(self, console: Any, *, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None

    def start(self, batch_id: str, validation: Validation) -> None:
        self.console.print(
            f"batch {batch_id}: {validation.valid} lines to run"
            + (f", {validation.invalid} invalid skipped" if validation.invalid else "")
            + f"  (genq batch status {batch_id} / genq batch cancel {batch_id})",
            soft_wrap=True,
        )
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("batch", total=validation.valid, detail="")
        self.progress.start()

    def update(self, progress: Progress) -> None:
        if self.progress is None:
            return
        counts = progress.counts
        eta = "?" if progress.eta_s is None else _duration(progress.eta_s)
        detail = (
            f"ok {counts.completed}  failed {counts.failed + counts.cancelled}  in flight {progress.in_flight}"
            f"  {progress.tokens_per_s:,.0f} tok/s  ETA {eta}"
        )
        self.progress.update(self.task, completed=counts.written, detail=detail, description=progress.status.value)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
