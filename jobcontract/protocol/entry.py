"""The queue entry codec: how a dramatiq message sits in a queue's stream and in dead letters.

The Lua side of the same codec is entry.lua (add_entry, read_entry, add_dead_letter); the two are
the only places that name the fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobcontract.limits import DEAD_LETTERS_MAX, DEAD_LETTERS_MAX_AGE_S

MESSAGE_FIELD = "m"  # the encoded dramatiq message
REDELIVERIES_FIELD = "r"  # times handed back after its worker died
QUEUE_FIELD = "queue"  # of a dead letter: the queue it was taken from
REASON_FIELD = "reason"  # of a dead letter: why it was given up


def entry_fields(message: bytes, redeliveries: int = 0) -> dict[Any, Any]:
    """The fields of a new queue entry (XADD)."""
    return {MESSAGE_FIELD: message, REDELIVERIES_FIELD: redeliveries}


@dataclass(frozen=True)
class QueueEntry:
    message: bytes | None  # None: the entry holds no message (deleted while pending, or malformed)
    redeliveries: int

    @classmethod
    def read(cls, fields: dict[Any, Any]) -> QueueEntry:
        raw = fields.get(MESSAGE_FIELD.encode(), fields.get(MESSAGE_FIELD))
        redeliveries = fields.get(REDELIVERIES_FIELD.encode(), fields.get(REDELIVERIES_FIELD, 0))
        return cls(None if raw is None else _bytes(raw), int(redeliveries))


@dataclass(frozen=True)
class DeadLetterCap:
    """How many dead letters are kept, and for how long: every XADD to the dead-letter stream trims
    it (MAXLEN ~, then MINID ~ when an age is set), so a poison flood cannot fill Redis. `~` lets
    Redis trim whole stream nodes only, so the stream may hold up to about a hundred more."""

    max_len: int = DEAD_LETTERS_MAX
    max_age_s: float = DEAD_LETTERS_MAX_AGE_S  # 0: no age limit

    def args(self) -> list[Any]:
        """ARGV of add_dead_letter (entry.lua): the count cap, then the age cap in ms (0: none)."""
        return [self.max_len, int(self.max_age_s * 1000)]


DEFAULT_CAP = DeadLetterCap()


@dataclass(frozen=True)
class DeadLetterEntry:
    message: bytes
    queue: str
    reason: str

    @classmethod
    def read(cls, fields: dict[Any, Any]) -> DeadLetterEntry:
        def get(name: str) -> Any:
            return fields.get(name.encode(), fields.get(name, b""))

        queue = _text(get(QUEUE_FIELD))
        # Older entries named the stream key (`ns:q:queue`); the queue is what an operator knows.
        queue = queue.split(":q:", 1)[1] if ":q:" in queue else queue
        return cls(_bytes(get(MESSAGE_FIELD)), queue, _text(get(REASON_FIELD)))


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
