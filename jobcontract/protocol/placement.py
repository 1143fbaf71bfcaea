"""Which models each worker serves and holds, and its memory budget: published by every worker,
read by admission (to refuse a model no live worker can ever load), by the scheduler (to send a job
where its model is loaded), by `genq models` and by the gateway's /v1/models.

One hash of records (worker -> JSON) and a sorted set of the Redis-clock instant (µs) until which
each record holds, renewed by its worker about every second: a worker that dies simply stops being
answered once its instant passes, as pool liveness does (liveness.py). Records are written whole by
their one owner, so a record never mixes two moments of a worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jobcontract.keys import Keys
from jobcontract.protocol.operation import Operation, text


def records_key(keys: Keys) -> str:
    return keys.placement


def until_key(keys: Keys) -> str:
    return keys.placement_until


@dataclass(frozen=True)
class WorkerModels:
    """One worker process's models: those it may serve, those loaded now (with their servers' URLs
    unneeded outside it, so not published), every one's recorded size, and its budget.

    `budget_bytes` is None for a single-model worker (`--model x`): its one model is always loaded,
    whatever its size, as before multi-model workers existed."""

    worker: str
    host: str
    backend: str
    budget_bytes: int | None
    serves: tuple[str, ...]
    loaded: tuple[str, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)
    used_bytes: int = 0

    def fits(self, model: str) -> bool:
        """Whether this worker could ever hold `model` (alone if need be)."""
        if model not in self.serves:
            return False
        return self.budget_bytes is None or self.sizes.get(model, 0) <= self.budget_bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "worker": self.worker,
                "host": self.host,
                "backend": self.backend,
                "budget_bytes": self.budget_bytes,
                "serves": list(self.serves),
                "loaded": list(self.loaded),
                "sizes": dict(self.sizes),
                "used_bytes": self.used_bytes,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerModels:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            worker=str(data["worker"]),
            host=str(data.get("host", "")),
            backend=str(data.get("backend", "")),
            budget_bytes=None if data.get("budget_bytes") is None else int(data["budget_bytes"]),
            serves=tuple(data.get("serves", ())),
            loaded=tuple(data.get("loaded", ())),
            sizes={str(k): int(v) for k, v in data.get("sizes", {}).items()},
            used_bytes=int(data.get("used_bytes", 0)),
        )


@dataclass(frozen=True)
class PublishModels(Operation[int]):
    """Write a worker's record, held for `ttl_ms`; drop records nobody renewed. Answers how many."""

    SCRIPT: ClassVar[str] = "placement_publish.lua"

    names: Keys
    record: WorkerModels
    ttl_ms: int

    def keys(self) -> list[str]:
        return [records_key(self.names), until_key(self.names)]

    def args(self) -> list[Any]:
        return [self.ttl_ms, self.record.worker, self.record.to_json()]

    def parse(self, reply: Any) -> int:
        return int(reply)


@dataclass(frozen=True)
class WithdrawModels(Operation[int]):
    """Remove stopping workers' records at once (a dead one's lapse by themselves)."""

    SCRIPT: ClassVar[str] = "placement_withdraw.lua"

    names: Keys
    workers: Sequence[str]

    def keys(self) -> list[str]:
        return [records_key(self.names), until_key(self.names)]

    def args(self) -> list[Any]:
        return list(self.workers)

    def parse(self, reply: Any) -> int:
        return int(reply)


@dataclass(frozen=True)
class ReadModels(Operation[list[WorkerModels]]):
    """The records of the workers live now, on the Redis clock."""

    SCRIPT: ClassVar[str] = "placement_read.lua"

    names: Keys

    def keys(self) -> list[str]:
        return [records_key(self.names), until_key(self.names)]

    def args(self) -> list[Any]:
        return []

    def parse(self, reply: Any) -> list[WorkerModels]:
        return sorted((WorkerModels.from_json(text(r)) for r in reply or []), key=lambda w: w.worker)
