"""What a caller's reads of a job decide, without any I/O: shared by JobStore and AsyncJobStore.

Like httpx's BaseClient, the sync and asyncio stores keep only their round trips; cursors, the
parsing of an XREAD reply, deadlines and block times, which index of a token stream is new and what a
cancel does to a job in a given state are decided here, once, so the two stores cannot drift apart.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobcontract.connection import MAX_BLOCK_MS, StreamReply
from jobcontract.keys import Keys
from jobcontract.models import GenerationResult, JobState, JobStatus, TokenEvent, utc_from_micros

# XREAD's {stream key: cursor}; redis-py wants a dict of its own loose key type.
Streams = dict[Any, Any]
RESULTS_PER_READ = 100
TOKENS_PER_READ = 256


class Deadline:
    """A caller's timeout as the block time of each XREAD: never past the deadline, never over
    MAX_BLOCK_MS (so a reader notices a job whose record vanished), TimeoutError once it has passed."""

    def __init__(self, timeout_s: float | None, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def block_ms(self) -> int:
        if self.at is None:
            return MAX_BLOCK_MS
        left_ms = int((self.at - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise TimeoutError(f"{self.what} after {self.timeout_s}s")
        return max(1, min(MAX_BLOCK_MS, left_ms))


class ResultWait:
    """Waiting for several jobs' `done` events, each on its own event stream.

    A `done` event carries the job's result (finish.lua, fail_job.lua), so a waiter needs no
    second round trip for it; `carried` is None for an event written without one (a record from
    before this), and the caller then reads the job's record as before."""

    def __init__(self, keys: Keys, job_ids: Iterable[str], timeout_s: float | None) -> None:
        self.carried_results: dict[str, bytes] = {}
        self.pending = {keys.events(j): j for j in job_ids}
        self.cursors = dict.fromkeys(self.pending, "0-0")
        self.deadline = Deadline(timeout_s, "job(s) not finished")

    def block_ms(self) -> int:
        self.deadline.what = f"{len(self.pending)} job(s) not finished"
        return self.deadline.block_ms()

    def streams(self) -> Streams:
        return {k: self.cursors[k] for k in self.pending}

    def take(self, reply: StreamReply) -> list[str]:
        """The jobs this reply shows done (no longer pending): their results are to be read."""
        ended: list[str] = []
        for stream, entries in reply:
            key = text(stream)
            for entry_id, fields in entries:
                self.cursors[key] = text(entry_id)
                if fields.get(b"type") == b"done":
                    job_id = self.pending.pop(key)
                    raw = fields.get(b"result")
                    if raw is not None:
                        self.carried_results[job_id] = raw
                    ended.append(job_id)
                    break
        return ended

    def carried(self, job_id: str) -> GenerationResult | None:
        raw = self.carried_results.pop(job_id, None)
        return None if raw is None else GenerationResult.model_validate_json(raw)


class StoredResult:
    """Where a finished job's result is stored. finish.lua keeps it once, in the job's `done` event,
    and names that event in the record (`result_at`); fail_job.lua (and records from before) keep it
    in the record's `result` field. A reader fetches the record's two fields and the event stream's
    last entry in one round trip (`FIELDS`, then `find`): the done event is its last entry but for a
    token a stray attempt published after it, when `find` asks for the event by its id (`missing`)."""

    FIELDS = ("result", "result_at")

    def __init__(self, fields: list[Any]) -> None:
        self.inline, at = fields
        self.at = None if at is None else text(at)

    def find(self, entries: Any) -> bytes | None:
        """The result's JSON, given the event stream's last entry (XREVRANGE COUNT 1) or the entry
        fetched by `missing`; None when there is none (not finished, expired, or replayed since)."""
        if self.inline is not None:
            return bytes(self.inline)
        for entry_id, entry in entries:
            if text(entry_id) == self.at:
                raw = entry.get(b"result")
                return None if raw is None else bytes(raw)
        return None

    def missing(self, entries: Any) -> str | None:
        """The done event's id when `entries` do not hold it and it must be read by id."""
        if self.inline is not None or self.at is None:
            return None
        return None if any(text(entry_id) == self.at for entry_id, _ in entries) else self.at


def parse_result(raw: bytes | None) -> GenerationResult | None:
    return None if raw is None else GenerationResult.model_validate_json(raw)


class TokenRead:
    """One job's tokens from its event stream, from the start, so a late reader misses none.

    A job retried after a failed attempt (here or on another backend) publishes its tokens again
    from index 0: an index already handed out is dropped, so every reader (Client.stream,
    AsyncClient.stream, the gateway's SSE) yields each index once, the first attempt's text for it.
    An event holds one token (`token`: i, t) or several in a row (`tokens`: i of the first, ts a
    JSON list): a worker groups tokens that come faster than Redis needs them (workers.token_batch)."""

    def __init__(self, keys: Keys, job_id: str, timeout_s: float | None) -> None:
        self.job_id = job_id
        self.key = keys.events(job_id)
        self.cursor = "0-0"
        self.next_index = 0
        self.done = False
        self.deadline = Deadline(timeout_s, f"job {job_id} still streaming")

    def block_ms(self) -> int:
        return self.deadline.block_ms()

    def streams(self) -> Streams:
        return {self.key: self.cursor}

    def take(self, reply: StreamReply) -> list[TokenEvent]:
        fresh: list[TokenEvent] = []
        for _stream, entries in reply:
            for entry_id, fields in entries:
                self.cursor = text(entry_id)
                if fields.get(b"type") == b"done":
                    self.done = True
                    return fresh
                first = int(fields[b"i"])
                texts = json.loads(fields[b"ts"]) if b"ts" in fields else [text(fields[b"t"])]
                for index, piece in enumerate(texts, start=first):
                    if index < self.next_index:
                        continue  # a retried attempt replaying what an earlier one already streamed
                    self.next_index = index + 1
                    fresh.append(TokenEvent(job_id=self.job_id, index=index, text=piece))
        return fresh


def token_event(first: int, texts: list[str]) -> dict[Any, Any]:
    """The event fields of tokens `first`, `first + 1`, ... (read back by TokenRead.take)."""
    if len(texts) == 1:
        return {"type": "token", "i": first, "t": texts[0]}
    return {"type": "tokens", "i": first, "ts": json.dumps(texts, ensure_ascii=False)}


@dataclass(frozen=True)
class JobEnd:
    """What a reader of finished jobs (a batch) needs of one record; state None: the record expired."""

    job_id: str
    state: JobState | None
    result: GenerationResult | None
    marked: bool


class CancelStep(enum.Enum):
    """What `cancel` does to a job, from its status read inside the transaction."""

    NOTHING = "nothing"  # already ended: its state is the answer
    ASK_WORKER = "ask_worker"  # running: flag it and tell its worker to abort
    FINISH_NOW = "finish_now"  # queued: finish it as cancelled, it will never run


def cancel_step(status: JobStatus) -> CancelStep:
    if status.state.terminal:
        return CancelStep.NOTHING
    if status.state is JobState.RUNNING:
        return CancelStep.ASK_WORKER
    return CancelStep.FINISH_NOW


def redis_instant(reply: Any) -> datetime:
    """Redis TIME's (seconds, microseconds) as an instant."""
    seconds, micros = reply
    return utc_from_micros(int(seconds) * 1_000_000 + int(micros))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
