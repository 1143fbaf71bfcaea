"""Worker liveness: vouching for a pool's workers, and asking whether a pool has a live one.

A pool's sorted set scores each worker with the Redis-clock instant (µs) until which it is vouched
for; live.lua is the one reading of it, shared by admission (submit.lua) and LiveWorkers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.protocol.operation import Operation


@dataclass(frozen=True)
class Vouch(Operation[int]):
    """Renew each worker's liveness key; put the ready ones in the pool set until now + ttl, and
    drop the pool's workers nobody vouched for in time."""

    SCRIPT: ClassVar[str] = "vouch.lua"

    names: Keys
    pool: str  # pool_name(model, backend)
    workers: Sequence[str]
    ready: Sequence[bool]
    ttl_ms: int

    def keys(self) -> list[str]:
        return [self.names.pool(self.pool), *(self.names.alive(w) for w in self.workers)]

    def args(self) -> list[Any]:
        return [self.ttl_ms, *self.workers, *("1" if r else "0" for r in self.ready)]

    def parse(self, reply: Any) -> int:
        return int(reply)


@dataclass(frozen=True)
class LiveWorkers(Operation[list[int]]):
    """How many workers each (model, backend) pool has vouched alive now, on the Redis clock."""

    SCRIPT: ClassVar[str] = "live_workers.lua"

    names: Keys
    pools: Sequence[tuple[str, Backend]]

    def keys(self) -> list[str]:
        return [self.names.pool(pool_name(model, backend)) for model, backend in self.pools]

    def args(self) -> list[Any]:
        return []

    def parse(self, reply: Any) -> list[int]:
        return [int(n) for n in reply]
