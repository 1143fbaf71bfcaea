"""Where a batch's input lines come from: a file on disk (the CLI) or an uploaded file in Redis (the
gateway). Both are read front to back in bounded pieces, so a 100k-line file is never held whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import redis

# A source is something that can be read from the start again: validation is one pass, submission another.
LineSource = Callable[[], Iterator[tuple[int, bytes]]]
CHUNK_BYTES = 1 << 20


class InputGone(RuntimeError):
    """The input vanished (deleted, or expired) while it was read: what was read is not the whole
    input, so it must not be taken for its end."""


def file_source(path: Path) -> LineSource:
    def lines() -> Iterator[tuple[int, bytes]]:
        with path.open("rb") as handle:
            yield from enumerate(handle, start=1)

    return lines


def redis_source(client: redis.Redis, key: str) -> LineSource:
    def lines() -> Iterator[tuple[int, bytes]]:
        offset, number, rest = 0, 0, b""
        while True:
            piece = _bytes(client.getrange(key, offset, offset + CHUNK_BYTES - 1))
            if not piece:
                # GETRANGE reads a missing key as empty: only a key that is still there has ended.
                if not client.exists(key):
                    raise InputGone(f"{key} is gone after {offset} bytes ({number} lines) were read")
                break
            offset += len(piece)
            *complete, rest = (rest + piece).split(b"\n")
            for line in complete:
                number += 1
                yield number, line
        if rest:
            yield number + 1, rest

    return lines


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
