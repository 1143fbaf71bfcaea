"""The scheduler's take (take.lua): the next entries a consumer gets, tenants served in turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import CONSUMER_GROUP, DEFAULT_TENANT, TENANT_LANE_INFIX, Keys
from jobcontract.protocol.operation import Operation, text
from jobcontract.scheduling import TakePlan


@dataclass(frozen=True)
class TakenEntry:
    stream: str  # the lane it came from: where it is acked, and handed back to
    entry_id: str
    fields: dict[bytes, bytes]


@dataclass(frozen=True)
class Taken:
    entries: list[TakenEntry]
    streams: list[str]  # what a blocking read waits on when nothing was taken


@dataclass(frozen=True)
class Take(Operation[Taken]):
    """Take up to `room` entries for `consumer` by `plan` (see jobcontract.scheduling)."""

    SCRIPT: ClassVar[str] = "take.lua"

    names: Keys
    consumer: str
    room: int
    plan: TakePlan

    def keys(self) -> list[str]:
        keys = [self.names.tenant_shares]
        for tier in self.plan.tiers:
            keys += [self.names.stream(tier.queue), self.names.lanes(tier.queue), self.names.fair_tags(tier.queue)]
        return keys

    def args(self) -> list[Any]:
        head = [CONSUMER_GROUP, self.consumer, self.room, TENANT_LANE_INFIX, DEFAULT_TENANT]
        return head + [tier.min_age_ms for tier in self.plan.tiers]

    def parse(self, reply: Any) -> Taken:
        raw_entries, raw_streams = reply
        entries = [
            TakenEntry(text(stream), text(entry_id), _fields(fields)) for stream, entry_id, fields in raw_entries
        ]
        return Taken(entries, [text(s) for s in raw_streams])


def _fields(flat: list[Any]) -> dict[bytes, bytes]:
    """Lua hands a stream entry's fields back as a flat list; the entry codec reads a dict."""
    return {_bytes(flat[i]): _bytes(flat[i + 1]) for i in range(0, len(flat), 2)}


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
