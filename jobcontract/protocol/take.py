"""The scheduler's take (take.lua): the next entries a consumer gets, tenants served in turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import CONSUMER_GROUP, DEFAULT_TENANT, PARTITION_INFIX, Keys, parse_queue
from jobcontract.protocol.operation import Operation, text
from jobcontract.scheduling import TakePlan


@dataclass(frozen=True)
class TakenEntry:
    stream: str  # the partition it came from: where it is acked, and handed back to
    entry_id: str
    fields: dict[bytes, bytes]


@dataclass(frozen=True)
class Taken:
    entries: list[TakenEntry]
    streams: list[str]  # what a blocking read waits on when nothing was taken
    wake_ms: int | None  # when the first entry held back by an age bound comes of age (None: none waits)
    hidden: int = 0  # partitions of age-bounded tiers: not in `streams`, so a blocking read misses them


@dataclass(frozen=True)
class Take(Operation[Taken]):
    """Take up to `room` entries for `consumer` by `plan` (see jobcontract.scheduling and take.lua)."""

    SCRIPT: ClassVar[str] = "take.lua"

    names: Keys
    consumer: str
    room: int
    plan: TakePlan
    warm: tuple[str, ...] = ()  # partitions this consumer took from lately: read as its own

    def keys(self) -> list[str]:
        keys = [self.names.tenant_shares]
        for tier in self.plan.tiers:
            ref = parse_queue(tier.queue)
            pool = self.names.pool(ref.pool if ref is not None else tier.queue)  # whose live workers own shards
            queue = tier.queue
            keys += [self.names.stream(queue), self.names.partitions(queue), self.names.fair_tags(queue), pool]
        return keys

    def args(self) -> list[Any]:
        args: list[Any] = [CONSUMER_GROUP, self.consumer, self.room, PARTITION_INFIX, DEFAULT_TENANT]
        for tier in self.plan.tiers:
            args += [tier.min_age_ms, tier.select.value]
        return [*args, *self.warm]

    def parse(self, reply: Any) -> Taken:
        raw_entries, raw_streams, wake_ms, hidden = reply
        entries = [
            TakenEntry(text(stream), text(entry_id), _fields(fields)) for stream, entry_id, fields in raw_entries
        ]
        wake = int(wake_ms)
        return Taken(entries, [text(s) for s in raw_streams], None if wake < 0 else wake, int(hidden))


def _fields(flat: list[Any]) -> dict[bytes, bytes]:
    """Lua hands a stream entry's fields back as a flat list; the entry codec reads a dict."""
    return {_bytes(flat[i]): _bytes(flat[i + 1]) for i in range(0, len(flat), 2)}


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
