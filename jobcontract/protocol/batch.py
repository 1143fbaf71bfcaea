"""A batch's state changes: its status, its runner's lease, the jobs it queued, the lines written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import Keys
from jobcontract.protocol.operation import Operation, text


@dataclass(frozen=True)
class BatchAdvance(Operation[str | None]):
    """Move to `status` if allowed (only forward; once cancelling only to cancelled); the status the
    batch now has, None when there is no batch."""

    SCRIPT: ClassVar[str] = "batch_advance.lua"

    names: Keys
    batch_id: str
    status: str
    now_s: int

    def keys(self) -> list[str]:
        return [self.names.batch(self.batch_id)]

    def args(self) -> list[Any]:
        return [self.status, self.now_s]

    def parse(self, reply: Any) -> str | None:
        return text(reply) or None


@dataclass(frozen=True)
class BatchLease(Operation[bool]):
    """Take the batch's runner lease if free or already ours, for ttl_ms."""

    SCRIPT: ClassVar[str] = "batch_lease.lua"

    names: Keys
    batch_id: str
    owner: str
    ttl_ms: int

    def keys(self) -> list[str]:
        return [self.names.batch_lease(self.batch_id)]

    def args(self) -> list[Any]:
        return [self.owner, self.ttl_ms]

    def parse(self, reply: Any) -> bool:
        return bool(reply)


@dataclass(frozen=True)
class BatchRecordJobs(Operation[int]):
    """Record the jobs just queued (job id -> custom_id) through an input line; the batch's count of
    distinct jobs."""

    SCRIPT: ClassVar[str] = "batch_record.lua"

    names: Keys
    batch_id: str
    jobs: Mapping[str, str]
    through_line: int
    ttl_s: int

    def keys(self) -> list[str]:
        return [self.names.batch_jobs(self.batch_id), self.names.batch(self.batch_id)]

    def args(self) -> list[Any]:
        args: list[Any] = [self.ttl_s, self.through_line]
        for job_id, custom_id in self.jobs.items():
            args += [job_id, custom_id]
        return args

    def parse(self, reply: Any) -> int:
        return int(reply)


@dataclass(frozen=True)
class MarkWritten(Operation[int]):
    """Flag the jobs whose output line is written, on records that still exist."""

    SCRIPT: ClassVar[str] = "mark_written.lua"

    names: Keys
    job_ids: Sequence[str]
    field: str

    def keys(self) -> list[str]:
        return [self.names.job(j) for j in self.job_ids]

    def args(self) -> list[Any]:
        return [self.field]

    def parse(self, reply: Any) -> int:
        return int(reply)
