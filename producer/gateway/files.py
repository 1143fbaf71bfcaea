"""`/v1/files`: uploads for batches and the files batches write, kept in Redis so they outlive the
gateway process. Content moves in 1 MiB pieces both ways: a large file is never held in memory."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

import redis
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from jobcontract.keys import Keys
from producer.gateway.errors import ApiError
from producer.gateway.guards import ResourceId
from producer.gateway.services import Services, services

CHUNK = 1 << 20
router = APIRouter(prefix="/v1/files", tags=["openai batch"])


class FileStore:
    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def create(self, filename: str, purpose: str, content: BinaryIO) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex}"
        key = self.keys.file_content(file_id)
        self.client.delete(key)
        while piece := content.read(CHUNK):
            self.client.append(key, piece)
        self.client.expire(key, self.ttl_s)
        self.record(file_id, filename, purpose)
        return self.get(file_id)

    def record(self, file_id: str, filename: str, purpose: str) -> None:
        """The file's metadata; its content key may be written before (a batch's output) or after."""
        now = int(time.time())
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self.keys.file(file_id),
            mapping={"id": file_id, "filename": filename, "purpose": purpose, "created_at": now},
        )
        pipe.expire(self.keys.file(file_id), self.ttl_s)
        pipe.expire(self.keys.file_content(file_id), self.ttl_s)
        pipe.zadd(self.keys.files, {file_id: now})
        pipe.execute()

    def get(self, file_id: str) -> dict[str, Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.file(file_id))
        pipe.strlen(self.keys.file_content(file_id))
        raw, size = pipe.execute()
        if not raw:
            raise ApiError(404, f"no file {file_id!r}", code="not_found")
        fields = {k.decode(): v.decode() for k, v in raw.items()}
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

    def content(self, file_id: str) -> Iterator[bytes]:
        key, offset = self.keys.file_content(file_id), 0
        while True:
            piece = _bytes(self.client.getrange(key, offset, offset + CHUNK - 1))
            if not piece:
                return
            offset += len(piece)
            yield piece

    def recent(self, *, limit: int, after: str | None, purpose: str | None) -> list[dict[str, Any]]:
        ids = [_bytes(i).decode() for i in self.client.zrevrange(self.keys.files, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        found: list[dict[str, Any]] = []
        for file_id in ids:
            if len(found) >= limit:
                break
            try:
                item = self.get(file_id)
            except ApiError:
                self.client.zrem(self.keys.files, file_id)
                continue
            if purpose is None or item["purpose"] == purpose:
                found.append(item)
        return found

    def delete(self, file_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.file(file_id), self.keys.file_content(file_id))
        pipe.zrem(self.keys.files, file_id)
        return bool(pipe.execute()[0])


# The endpoints are plain functions: FastAPI runs them in its thread pool, where blocking Redis calls are fine.
@router.post("", summary="Upload a file (purpose=batch: an OpenAI Batch input JSONL)")
def upload(
    file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()], s: Annotated[Services, Depends(services)]
) -> dict[str, Any]:
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose!r} is not supported; genq takes 'batch'", param="purpose")
    return s.files.create(file.filename or "upload.jsonl", purpose, file.file)


@router.get("", summary="List files, newest first")
def list_files(
    s: Annotated[Services, Depends(services)],
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
) -> dict[str, Any]:
    data = s.files.recent(limit=limit + 1, after=after, purpose=purpose)
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit}


@router.get("/{file_id}", summary="A file's metadata")
def retrieve(file_id: ResourceId, s: Annotated[Services, Depends(services)]) -> dict[str, Any]:
    return s.files.get(file_id)


@router.get("/{file_id}/content", summary="A file's content", response_class=StreamingResponse)
def content(file_id: ResourceId, s: Annotated[Services, Depends(services)]) -> StreamingResponse:
    s.files.get(file_id)  # 404 for an unknown file
    return StreamingResponse(s.files.content(file_id), media_type="application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file")
def delete(file_id: ResourceId, s: Annotated[Services, Depends(services)]) -> dict[str, Any]:
    if not s.files.delete(file_id):
        raise ApiError(404, f"no file {file_id!r}", code="not_found")
    return {"id": file_id, "object": "file", "deleted": True}


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
