"""Files of /v1/files in Redis, each owned by a tenant and held to the tenant's bounds.

A file is a hash (name, purpose, creation time, `tenant`) and a content string, both with the result
TTL. Each tenant has a listing index (ids by creation time), so its listing never reads another
tenant's files, and a sorted set of its files' sizes, for its bounds on files and bytes. Every index
is written through IndexAdd (jobcontract.protocol.index): it prunes ids whose file is gone and
carries the files' TTL, so it stays bounded even for a tenant that never lists. An upload
first reserves its place (one Lua call: drop the ids whose file is gone, check both bounds, add the
id and create the content key with its TTL), so concurrent uploads on several gateways never
overshoot and even a gateway killed mid-upload leaves only a key that expires; an upload that fails
deletes what it wrote and gives its bytes back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import astuple
from typing import Any, BinaryIO

import redis

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.protocol.gateway import FileReserve
from jobcontract.protocol.index import IndexAdd
from producer.batch.book import BatchStatus
from producer.gateway.api_keys import Caller, FileBounds
from producer.gateway.errors import ApiError

CHUNK = 1 << 20


def not_found(file_id: str) -> ApiError:
    """The one answer for a file that does not exist and for another tenant's file (no oracle)."""
    return ApiError(404, f"no file {file_id!r}", code="not_found")


class FileStore:
    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def create(
        self, filename: str, purpose: str, content: BinaryIO, caller: Caller, bounds: FileBounds
    ) -> dict[str, Any]:
        size = _size(content)
        if size > bounds.max_upload_bytes:
            raise ApiError(
                413,
                f"the file has {size} bytes, over the limit of {bounds.max_upload_bytes} bytes for one upload",
                code="file_too_large",
            )
        file_id, tenant = f"file-{uuid.uuid4().hex}", caller.tenant
        try:
            self._admit(file_id, tenant, size, bounds)
            while piece := content.read(CHUNK):
                self.client.append(self.keys.file_content(file_id), piece)  # keeps the TTL set at admission
            self.record(file_id, filename, purpose, tenant)
        except BaseException as error:
            self.forget(file_id, tenant)
            if _out_of_memory(error):
                raise ApiError(
                    503,
                    "Redis is out of memory: the file was not stored (nothing of it was kept); retry later",
                    "server_error",
                    code="storage_full",
                    headers={"Retry-After": "10"},
                ) from None
            raise
        return self.get(file_id, caller)

    def _admit(self, file_id: str, tenant: str, size: int, bounds: FileBounds) -> None:
        reserve = FileReserve(self.keys, tenant, file_id, size, bounds.max_files, bounds.max_bytes, self.ttl_s)
        outcome, count, total = astuple(protocol.run(self.client, reserve))
        if outcome == "files":
            raise ApiError(
                429,
                f"tenant {tenant!r} has {count} files, its limit; delete some (or wait for them to expire)",
                "rate_limit_error",
                code="too_many_files",
            )
        if outcome == "bytes":
            raise ApiError(
                429,
                f"tenant {tenant!r}'s files hold {total} of its {bounds.max_bytes} bytes: no room for {size} more; "
                "delete some files (or wait for them to expire)",
                "rate_limit_error",
                code="file_storage_full",
            )

    def record(self, file_id: str, filename: str, purpose: str, tenant: str) -> None:
        """The file's metadata and its place in its tenant's listing and bytes; its content key may be
        written before (a batch's output) or after."""
        now = int(time.time())
        size = int(self.client.strlen(self.keys.file_content(file_id)))
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self.keys.file(file_id),
            mapping={"id": file_id, "filename": filename, "purpose": purpose, "created_at": now, "tenant": tenant},
        )
        pipe.expire(self.keys.file(file_id), self.ttl_s)
        pipe.expire(self.keys.file_content(file_id), self.ttl_s)
        indexes = [self.keys.files, self.keys.tenant_files(tenant), self.keys.tenant_file_bytes(tenant)]
        listed = IndexAdd(indexes, [now, now, size], file_id, self.ttl_s, self.keys.file(""), ":content")
        protocol.send(pipe, self.client, listed)
        pipe.execute()

    def forget(self, file_id: str, tenant: str) -> bool:
        """Delete the file and its places in the listings and the tenant's bytes; whether it existed.
        Not a MULTI: Redis out of memory refuses any command queued in a transaction, even a DEL."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.file(file_id), self.keys.file_content(file_id))
        pipe.zrem(self.keys.files, file_id)
        pipe.zrem(self.keys.tenant_files(tenant), file_id)
        pipe.zrem(self.keys.tenant_file_bytes(tenant), file_id)
        return bool(pipe.execute()[0])

    def touch(self, file_id: str) -> None:
        """Keep a file for another full TTL from now (an input its batch still reads), and the indexes
        that list it as long (an index's TTL is set from now on every write, so this never shortens it)."""
        tenant = self.owner(file_id)
        kept = [self.keys.file(file_id), self.keys.file_content(file_id), self.keys.files]
        if tenant is not None:
            kept += [self.keys.tenant_files(tenant), self.keys.tenant_file_bytes(tenant)]
        pipe = self.client.pipeline(transaction=False)
        for key in kept:
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, file_id: str, caller: Caller) -> dict[str, Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.file(file_id))
        pipe.strlen(self.keys.file_content(file_id))
        raw, size = pipe.execute()
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields or not caller.may_see(fields.get("tenant")):
            raise not_found(file_id)
        return {
            "id": file_id,
            "object": "file",
            "bytes": int(size),
            "created_at": int(fields["created_at"]),
            "filename": fields["filename"],
            "purpose": fields["purpose"],
            "status": "processed",
            "expires_at": int(fields["created_at"]) + self.ttl_s,
            "status_details": None,
        }

    def owner(self, file_id: str) -> str | None:
        value = self.client.hget(self.keys.file(file_id), "tenant")
        return None if value is None else _text(value)

    def readers(self, file_id: str) -> list[str]:
        """The unfinished gateway batches whose input this file is."""
        batch_ids = sorted(_text(b) for b in self.client.smembers(self.keys.active_batches))
        pipe = self.client.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hmget(self.keys.batch(batch_id), "input", "status")
        return [
            batch_id
            for batch_id, (source, status) in zip(batch_ids, pipe.execute(), strict=True)
            if source is not None
            and _text(source) == file_id
            and status is not None
            and not BatchStatus(_text(status)).terminal
        ]

    def content(self, file_id: str) -> Iterator[bytes]:
        key, offset = self.keys.file_content(file_id), 0
        while True:
            piece = _bytes(self.client.getrange(key, offset, offset + CHUNK - 1))
            if not piece:
                return
            offset += len(piece)
            yield piece

    def recent(self, caller: Caller, *, limit: int, after: str | None, purpose: str | None) -> list[dict[str, Any]]:
        """The caller's files (every file for one who sees all), newest first."""
        index = self.keys.files if caller.sees_all else self.keys.tenant_files(caller.tenant)
        ids = [_text(i) for i in self.client.zrevrange(index, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        found: list[dict[str, Any]] = []
        for file_id in ids:
            if len(found) >= limit:
                break
            try:
                item = self.get(file_id, caller)
            except ApiError:
                self.client.zrem(index, file_id)
                continue
            if purpose is None or item["purpose"] == purpose:
                found.append(item)
        return found


def _out_of_memory(error: BaseException | None) -> bool:
    """Redis refused a write for its maxmemory (directly, or as the cause of an aborted transaction)."""
    while error is not None:
        if isinstance(error, redis.exceptions.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(content: BinaryIO) -> int:
    """The upload's length: it is already spooled to disk (or memory) whole by the form parser."""
    start = content.tell()
    content.seek(0, 2)
    size = content.tell() - start
    content.seek(start)
    return size


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
