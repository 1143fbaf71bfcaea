"""The gateway's own state changes: a slot of a key's allowance, a file's place in its tenant's
bounds. A job's owner is written by its admission (jobcontract.protocol.jobs.Submit's `owner`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jobcontract.keys import Keys
from jobcontract.protocol.operation import Operation, text


@dataclass(frozen=True)
class QuotaReserve(Operation[bool]):
    """Add an id to a set of unfinished ids unless it holds `bound` already."""

    SCRIPT: ClassVar[str] = "quota_reserve.lua"

    members: str  # the key of the set
    item_id: str
    bound: int
    ttl_s: int

    def keys(self) -> list[str]:
        return [self.members]

    def args(self) -> list[Any]:
        return [self.bound, self.item_id, self.ttl_s]

    def parse(self, reply: Any) -> bool:
        return bool(reply)


@dataclass(frozen=True)
class FileRoom:
    outcome: str  # 'ok', or the bound that refused: 'files' or 'bytes'
    count: int  # the tenant's files before this one
    total: int  # their bytes


@dataclass(frozen=True)
class FileReserve(Operation[FileRoom]):
    """Drop the tenant's ids whose file is gone, check both bounds, add the id and create the content
    key with its TTL."""

    SCRIPT: ClassVar[str] = "file_reserve.lua"

    names: Keys
    tenant: str
    file_id: str
    size: int
    max_files: int
    max_bytes: int
    ttl_s: int

    def keys(self) -> list[str]:
        n = self.names
        return [n.tenant_file_bytes(self.tenant), n.tenant_files(self.tenant), n.file_content(self.file_id)]

    def args(self) -> list[Any]:
        return [self.file_id, self.size, self.max_files, self.max_bytes, self.ttl_s, self.names.file("")]

    def parse(self, reply: Any) -> FileRoom:
        return FileRoom(text(reply[0]), int(reply[1]), int(reply[2]))
