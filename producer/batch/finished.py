"""Which entries of a batch's stream of finished jobs become lines: each job once.

A job adds an entry to the stream each time it finishes, and replaying a dead letter (`genq dlq
replay`) makes a finished job run and finish again: a second entry for one job. A runner that
counted entries reached its total with another line still queued, ended the batch `completed`
and left that line out of both files. So a job's line is written once: the job's record is marked
once its line is out (a replay keeps the mark), and an entry of a job that runs again since it was
added (replayed, not finished yet) is passed over, because its next finish adds another entry.

The mark follows the sink's commit: a crash between the two leaves a written job unmarked, which
matters only if that very job is replayed later (its line would then be written a second time);
marking first could instead lose the line.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from jobcontract import protocol
from jobcontract.jobs import JobStore
from jobcontract.keys import Keys
from jobcontract.models import GenerationResult
from jobcontract.protocol.batch import MarkWritten

WRITTEN = "batch_written"


@dataclass(frozen=True)
class Finished:
    job_id: str
    result: GenerationResult | None  # None: the job's record expired before its line was written


def to_write(store: JobStore, job_ids: list[str]) -> list[Finished]:
    """The jobs among these stream entries whose line is due, in stream order, each once."""
    due: list[Finished] = []
    seen: set[str] = set()
    for end in store.ends(job_ids, mark=WRITTEN):
        if end.job_id in seen or end.marked:
            continue  # its line is out already: this entry is a replayed run finishing again
        if end.state is not None and not end.state.terminal:
            continue  # replayed and not finished: its next finish brings another entry
        seen.add(end.job_id)
        due.append(Finished(end.job_id, end.result))
    return due


def mark_written(client: redis.Redis, keys: Keys, job_ids: list[str]) -> None:
    if job_ids:
        protocol.run(client, MarkWritten(keys, job_ids, WRITTEN))
