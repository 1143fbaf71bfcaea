"""Listing indexes (sorted sets of object ids) that stay bounded: each write also prunes.

A file or a batch expires with its TTL, but the sorted sets that list it (every file, one tenant's
files and file sizes, every batch, one tenant's batches) would keep its id for ever: they were
pruned only when listed, and a tenant that never lists grew them without end. Adding to an index
is therefore one operation that also drops the oldest ids whose object is gone and keeps the index
itself for the objects' TTL, so an index holds about its live objects and dies after the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.protocol.operation import Operation

PRUNE_PROBE = 16  # ids checked per write: more than the one added, so dead ids drain while writes go on


@dataclass(frozen=True)
class IndexAdd(Operation[int]):
    """Add an object's id to its indexes (one score each), prune dead ids, renew the indexes' TTL;
    answers how many dead ids it dropped."""

    SCRIPT: ClassVar[str] = "index_add.lua"

    indexes: Sequence[str]
    scores: Sequence[float]
    member: str
    ttl_s: int
    object_prefix: str  # the object's key is object_prefix + id (Keys.file(""), Keys.batch(""))
    also_alive_suffix: str = ""  # a second key object_prefix + id + suffix that keeps it too (its content)
    probe: int = PRUNE_PROBE

    def keys(self) -> list[str]:
        return list(self.indexes)

    def args(self) -> list[Any]:
        return [self.member, self.ttl_s, self.object_prefix, self.also_alive_suffix, self.probe, *self.scores]

    def parse(self, reply: Any) -> int:
        return int(reply)
