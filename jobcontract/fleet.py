"""The workers' published models (jobcontract.protocol.placement), as admission reads them: at most
once a second per store, so checking that a model fits some worker costs a caller one round trip a
second, not one per submit. A second of staleness only delays a refusal (or its lifting) by as much:
budgets and sizes change when workers start, stop or find a model larger than its files said."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from jobcontract.protocol.placement import WorkerModels

FLEET_TTL_S = 1.0


class FleetCache:
    def __init__(self, ttl_s: float = FLEET_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._read_at = float("-inf")
        self._fleet: Sequence[WorkerModels] = ()

    def fresh(self) -> Sequence[WorkerModels] | None:
        """The cached records while they are young enough, else None (read them again)."""
        return self._fleet if time.monotonic() - self._read_at < self.ttl_s else None

    def keep(self, fleet: Sequence[WorkerModels]) -> Sequence[WorkerModels]:
        self._fleet, self._read_at = tuple(fleet), time.monotonic()
        return self._fleet

    def get(self, read: Callable[[], Sequence[WorkerModels]]) -> Sequence[WorkerModels]:
        cached = self.fresh()
        return cached if cached is not None else self.keep(read())

    async def get_async(self, read: Callable[[], Awaitable[Sequence[WorkerModels]]]) -> Sequence[WorkerModels]:
        cached = self.fresh()
        return cached if cached is not None else self.keep(await read())
