"""Dead letters: jobs given up after bounded attempts, kept in `{namespace}:dead` with their reason
until an operator replays or purges them (`genq dlq`).

Every path that gives a job up files its dramatiq message here: the rerouting middleware when
every try failed (the job's result is FAILED, retryable), the broker's janitor when a job kept
killing its workers, a consumer that met an undecodable entry. Replaying has to get past the
first-result-wins rule: the job already holds a terminal result, which a new run could never
replace and a waiter would read at once. So a replay, in one script, removes the old result and
the job's event stream (its `done` entry included), puts the job back to `queued` with a fresh
deadline and attempt budget, re-adds its message to its queue and deletes the dead letter. A
caller then waits on the job id as before and gets the new result; its idempotency key still
names it. A job that succeeded or was cancelled meanwhile is not replayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any

import dramatiq
import redis
from dramatiq.common import q_name

from jobcontract import protocol
from jobcontract.jobs import UnknownJob, parse_status
from jobcontract.keys import Keys
from jobcontract.models import GenerationRequest, JobStatus, utc_from_micros
from jobcontract.protocol.entry import DeadLetterEntry
from jobcontract.protocol.queue import Replay
from jobcontract.scheduling import message_partition


class ReplayRefused(Exception):
    """This dead letter cannot be replayed; the message says why and what to do instead."""


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    queue: str
    reason: str
    raw: bytes
    message: dramatiq.Message[Any] | None  # None when the entry could not be decoded

    @property
    def job_id(self) -> str | None:
        return None if self.message is None else self.message.message_id

    @property
    def dead_at(self) -> datetime:
        """When it was filed, on Redis's clock (stream entry ids are Redis milliseconds)."""
        return utc_from_micros(int(self.entry_id.split("-")[0]) * 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.entry_id,
            "job_id": self.job_id,
            "queue": self.queue,
            "dead_at": self.dead_at.isoformat(),
            "reason": self.reason,
        }

    def details(self) -> dict[str, Any]:
        body: dict[str, Any] = self.summary()
        if self.message is None:
            body["raw"] = self.raw.decode(errors="replace")[:2000]
        else:
            body["message"] = {
                "actor": self.message.actor_name,
                "queue": self.message.queue_name,
                "args": list(self.message.args),
                "kwargs": self.message.kwargs,
            }
        return body


@dataclass(frozen=True)
class Replayed:
    job_id: str
    queue: str
    previous_state: str


class DeadLetters:
    def __init__(self, client: redis.Redis, keys: Keys, *, default_timeout_s: float, result_ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.default_timeout_s = default_timeout_s
        self.result_ttl_s = result_ttl_s

    def count(self) -> int:
        return int(self.client.xlen(self.keys.dead_letters))

    def entries(self, limit: int | None = None) -> list[DeadLetter]:
        """Oldest first."""
        found = []
        for letter in self._scan():
            found.append(letter)
            if limit is not None and len(found) >= limit:
                break
        return found

    def get(self, ref: str) -> DeadLetter:
        """By dead-letter id (`1764...-0`) or by job id."""
        if _looks_like_entry_id(ref):
            entries = self.client.xrange(self.keys.dead_letters, min=ref, max=ref) or []
            if entries:
                return _parse(entries[0])
        for letter in self._scan():
            if letter.job_id == ref:
                return letter
        raise KeyError(f"no dead letter {ref!r}")

    def replay(self, ref: str) -> Replayed:
        letter = self.get(ref)
        if letter.message is None:
            raise ReplayRefused(f"dead letter {letter.entry_id} is undecodable ({letter.reason}); purge it")
        message = letter.message
        try:
            request = GenerationRequest.model_validate(message.kwargs["request"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReplayRefused(f"dead letter {letter.entry_id} carries no valid request: {error}") from error
        queue = q_name(message.queue_name)  # a job that died in a delay queue runs at once
        # Built anew, not copied: Message.copy merges options, and the old eta must go.
        fresh: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue,
            actor_name=message.actor_name,
            args=message.args,
            kwargs={**message.kwargs, "attempts": []},
            options={k: v for k, v in message.options.items() if k != "eta"},
            message_id=message.message_id,
            message_timestamp=message.message_timestamp,
        )
        timeout_us = int((request.timeout_s or self.default_timeout_s) * 1_000_000)
        job_id = message.message_id
        batch_id = message.kwargs.get("batch_id")
        replay = Replay(
            self.keys,
            entry_id=letter.entry_id,
            job_id=job_id,
            message=fresh.encode(),
            model=request.model,
            lane=request.lane.value,
            queue=queue,
            timeout_us=timeout_us,
            ttl_s=self.result_ttl_s,
            batch_id=batch_id,
            partition=message_partition(fresh.kwargs, fresh.options),
        )
        outcome, state = astuple(protocol.run(self.client, replay))
        if outcome == "gone":
            raise KeyError(f"dead letter {letter.entry_id} was replayed or purged meanwhile")
        if outcome == "refused":
            raise ReplayRefused(f"job {job_id} is {state} now; not replayed (purge the dead letter)")
        return Replayed(job_id=job_id, queue=queue, previous_state=state)

    def replay_all(self) -> tuple[list[Replayed], list[tuple[str, str]]]:
        """Replay every dead letter; returns those replayed and (id, why) for those refused."""
        replayed, refused = [], []
        for letter in self.entries():
            try:
                replayed.append(self.replay(letter.entry_id))
            except (ReplayRefused, KeyError) as error:
                refused.append((letter.entry_id, str(error)))
        return replayed, refused

    def purge(self, refs: list[str] | None = None) -> int:
        """Delete the given dead letters (ids or job ids), or every one when refs is None."""
        if refs is None:
            count = self.count()
            self.client.delete(self.keys.dead_letters)
            return count
        ids = [self.get(ref).entry_id for ref in refs]
        return int(self.client.xdel(self.keys.dead_letters, *ids)) if ids else 0

    def status(self, letter: DeadLetter) -> JobStatus | None:
        """The job's record as it stands, if it still has one."""
        if letter.job_id is None:
            return None
        try:
            return parse_status(letter.job_id, self.client.hgetall(self.keys.job(letter.job_id)))
        except UnknownJob:
            return None

    def _scan(self, page: int = 500) -> Iterator[DeadLetter]:
        cursor = "-"
        while True:
            entries = self.client.xrange(self.keys.dead_letters, min=cursor, count=page) or []
            for entry in entries:
                yield _parse(entry)
            if len(entries) < page:
                return
            cursor = "(" + _text(entries[-1][0])


def _parse(entry: Any) -> DeadLetter:
    raw_id, fields = entry
    letter = DeadLetterEntry.read(fields)
    try:
        message: dramatiq.Message[Any] | None = dramatiq.Message.decode(letter.message)
    except Exception:  # whatever it holds, it is listed
        message = None
    return DeadLetter(
        entry_id=_text(raw_id), queue=letter.queue, reason=letter.reason, raw=letter.message, message=message
    )


def _looks_like_entry_id(ref: str) -> bool:
    head, dash, tail = ref.partition("-")
    return bool(dash) and head.isdigit() and tail.isdigit()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
