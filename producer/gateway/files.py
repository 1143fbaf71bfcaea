"""`/v1/files`: uploads for batches and the files batches write, kept in Redis so they outlive the
gateway process (producer/gateway/file_store.py). Content moves in 1 MiB pieces both ways: a large
file is never held in memory. Each caller sees only its tenant's files; another tenant's file
answers exactly as one that does not exist."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from producer.gateway.errors import ApiError
from producer.gateway.file_store import FileStore, not_found
from producer.gateway.guards import ResourceId
from producer.gateway.security import CallerDep
from producer.gateway.services import Services, services

__all__ = ["FileStore", "router"]
router = APIRouter(prefix="/v1/files", tags=["openai batch"])


# The endpoints are plain functions: FastAPI runs them in its thread pool, where blocking Redis calls are fine.
@router.post("", summary="Upload a file (purpose=batch: an OpenAI Batch input JSONL)")
def upload(
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
) -> dict[str, Any]:
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose!r} is not supported; genq takes 'batch'", param="purpose")
    bounds = caller.file_bounds(s.settings.file_bounds)
    return s.files.create(file.filename or "upload.jsonl", purpose, file.file, caller, bounds)


@router.get("", summary="List files, newest first")
def list_files(
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
) -> dict[str, Any]:
    data = s.files.recent(caller, limit=limit + 1, after=after, purpose=purpose)
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit}


@router.get("/{file_id}", summary="A file's metadata")
def retrieve(file_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, Any]:
    return s.files.get(file_id, caller)


@router.get("/{file_id}/content", summary="A file's content", response_class=StreamingResponse)
def content(file_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> StreamingResponse:
    s.files.get(file_id, caller)  # 404 for an unknown file, or another tenant's
    return StreamingResponse(s.files.content(file_id), media_type="application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file (not the input of a batch that has not finished)")
def delete(file_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, Any]:
    s.files.get(file_id, caller)
    readers = s.files.readers(file_id)
    if readers:
        raise ApiError(
            409,
            f"file {file_id!r} is the input of batch {readers[0]!r}, which has not finished: cancel the batch "
            "or wait for it to finish, then delete the file",
            code="file_in_use",
        )
    if not s.files.forget(file_id, s.files.owner(file_id) or caller.tenant):
        raise not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
