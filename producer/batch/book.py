"""A batch's record in Redis: its status, counts and runner lease, readable from any terminal or
gateway, and the status transitions OpenAI's Batch API names."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.protocol.batch import BatchAdvance, BatchLease, BatchRecordJobs
from jobcontract.protocol.index import IndexAdd

BATCH_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED)


class UnknownBatch(KeyError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch {batch_id!r} (never created, or its record expired)")
        self.batch_id = batch_id


class BatchRecord(BaseModel):
    id: str
    status: BatchStatus
    origin: str = Field(description="'cli' or 'gateway': who writes its output.")
    input: str = Field(description="The input file's path (cli) or file id (gateway).")
    endpoint: str | None = None
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = Field(default=0, description="Valid lines; the requests the batch will make.")
    invalid: int = 0
    submitted: int = 0
    finished: int = Field(default=0, description="Jobs finished in Redis, written out or not.")
    completed: int = Field(default=0, description="Lines written to the output file.")
    failed: int = Field(default=0, description="Lines written to the error file (invalid lines aside).")
    cancelled: int = 0
    tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    completion_window: str = "24h"
    tenant: str | None = Field(default=None, description="Whose batch it is (gateway batches).")
    runner_alive: bool = False

    @property
    def in_flight(self) -> int:
        return max(0, self.submitted - self.finished)


_INT_FIELDS = {name for name, info in BatchRecord.model_fields.items() if info.annotation in (int, int | None)}


class BatchBook:
    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def create(self, batch_id: str, *, status: BatchStatus, origin: str, input: str, **fields: Any) -> bool:
        """Record a new batch; False (and nothing changed) when the id is already known."""
        now = int(time.time())
        record: dict[Any, Any] = {
            "id": batch_id,
            "status": status.value,
            "origin": origin,
            "input": input,
            "created_at": now,
        }
        record[f"{status.value}_at"] = now
        for name, value in fields.items():
            if value is not None:
                record[name] = json.dumps(value) if isinstance(value, dict | list) else value
        key = self.keys.batch(batch_id)
        if self.client.hexists(key, "status"):
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=record)
        pipe.expire(key, self.ttl_s)
        indexes = [self.keys.batches]
        if fields.get("tenant"):
            indexes.append(self.keys.tenant_batches(fields["tenant"]))
        listed = IndexAdd(indexes, [now] * len(indexes), batch_id, self.ttl_s, self.keys.batch(""))
        protocol.send(pipe, self.client, listed)
        if origin == "gateway":
            pipe.sadd(self.keys.active_batches, batch_id)
        pipe.execute()
        return True

    def get(self, batch_id: str) -> BatchRecord:
        key = self.keys.batch(batch_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.xlen(self.keys.batch_done(batch_id))
        pipe.exists(self.keys.batch_lease(batch_id))
        raw, finished, leased = pipe.execute()
        return parse_record(batch_id, raw, int(finished), bool(leased))

    def get_status(self, batch_id: str) -> BatchStatus:
        raw = self.client.hget(self.keys.batch(batch_id), "status")
        if raw is None:
            raise UnknownBatch(batch_id)
        return BatchStatus(raw.decode() if isinstance(raw, bytes) else str(raw))

    def exists(self, batch_id: str) -> bool:
        return bool(self.client.exists(self.keys.batch(batch_id)))

    def advance(self, batch_id: str, status: BatchStatus) -> BatchStatus | None:
        """Move to `status` if the transition is allowed; returns the status the batch now has."""
        text = protocol.run(self.client, BatchAdvance(self.keys, batch_id, status.value, int(time.time())))
        if text in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
            self.client.srem(self.keys.active_batches, batch_id)
        return BatchStatus(text) if text else None

    def update(self, batch_id: str, **fields: Any) -> None:
        mapping: dict[Any, Any] = {
            k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in fields.items() if v is not None
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.batch(batch_id), mapping=mapping)
        pipe.expire(self.keys.batch(batch_id), self.ttl_s)
        pipe.expire(self.keys.batches, self.ttl_s)  # listed as long as it lives (see keep_listed)
        pipe.execute()

    def keep_listed(self, tenant: str | None) -> None:
        """Keep a tenant's batch index as long as a batch of it that is still being written (an index's
        TTL is set from now on every write, so this never shortens it)."""
        if tenant:
            self.client.expire(self.keys.tenant_batches(tenant), self.ttl_s)

    def record_submitted(self, batch_id: str, jobs: dict[str, str], through_line: int) -> int:
        """`jobs`: job id -> custom_id of the lines just submitted, through input line `through_line`.
        Returns the batch's `submitted`: its distinct jobs, counted from what was queued rather than
        from lines read, so a line that named an existing job cannot leave a phantom in flight."""
        return protocol.run(self.client, BatchRecordJobs(self.keys, batch_id, jobs, through_line, self.ttl_s))

    def submitted_line(self, batch_id: str) -> int:
        return int(self.client.hget(self.keys.batch(batch_id), "submitted_line") or 0)

    def job_ids(self, batch_id: str, chunk: int = 1000) -> Iterator[list[str]]:
        piece: list[str] = []
        for job_id, _custom_id in self.client.hscan_iter(self.keys.batch_jobs(batch_id), count=chunk):
            piece.append(_text(job_id))
            if len(piece) >= chunk:
                yield piece
                piece = []
        if piece:
            yield piece

    def custom_ids(self, batch_id: str, job_ids: list[str]) -> list[str | None]:
        if not job_ids:
            return []
        found = self.client.hmget(self.keys.batch_jobs(batch_id), job_ids)
        return [None if c is None else _text(c) for c in found]

    def take_lease(self, batch_id: str, owner: str, ttl_s: float) -> bool:
        return protocol.run(self.client, BatchLease(self.keys, batch_id, owner, int(ttl_s * 1000)))

    def lease_holder(self, batch_id: str) -> str | None:
        holder = self.client.get(self.keys.batch_lease(batch_id))
        return None if holder is None else _text(holder)

    def break_lease(self, batch_id: str, holder: str) -> None:
        """Drop a lease whose holder is known dead, unless someone else took it meanwhile."""
        self.release_lease(batch_id, holder)

    def release_lease(self, batch_id: str, owner: str) -> None:
        key = self.keys.batch_lease(batch_id)
        holder = self.client.get(key)
        if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == owner:
            self.client.delete(key)

    def recent(self, *, limit: int = 20, after: str | None = None, tenant: str | None = None) -> list[BatchRecord]:
        """Newest first, OpenAI-style pagination by the last id seen; one tenant's only if named."""
        index = self.keys.batches if tenant is None else self.keys.tenant_batches(tenant)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in self.client.zrevrange(index, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        records: list[BatchRecord] = []
        for batch_id in ids:
            if len(records) >= limit:
                break
            try:
                records.append(self.get(batch_id))
            except UnknownBatch:
                self.client.zrem(index, batch_id)
        return records

    def active(self) -> list[str]:
        """The unfinished gateway batches; an id whose record is gone (expired while no gateway ran it)
        is dropped here, read every adoption round, so the set holds only batches that exist."""
        ids = sorted(_text(m) for m in self.client.smembers(self.keys.active_batches))
        pipe = self.client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(self.keys.batch(batch_id))
        alive = pipe.execute() if ids else []
        gone = [batch_id for batch_id, exists in zip(ids, alive, strict=True) if not exists]
        if gone:
            self.client.srem(self.keys.active_batches, *gone)
        return [batch_id for batch_id in ids if batch_id not in gone]


def parse_record(batch_id: str, raw: dict[Any, Any], finished: int, leased: bool) -> BatchRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if "status" not in fields:
        raise UnknownBatch(batch_id)
    data: dict[str, Any] = {k: v for k, v in fields.items() if k in BatchRecord.model_fields}
    for name in ("errors", "metadata"):
        if name in data:
            data[name] = json.loads(data[name])
    for name in _INT_FIELDS:
        if name in data:
            data[name] = int(data[name])
    # A replayed batch job finishes twice in the stream of finished jobs: count each job once.
    distinct = max(0, finished - int(fields.get("replayed", 0)))
    return BatchRecord.model_validate({**data, "finished": distinct, "runner_alive": leased})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
