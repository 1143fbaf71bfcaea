"""`/v1/batches` (OpenAI-compatible); the runners behind it are producer/gateway/batch_runs.py.

A batch created here is run by the same loop as `genq batch run` (producer/batch/runner.py), in a
thread of the gateway, reading its input from /v1/files in Redis and appending its output and error
files there. Everything a runner needs to resume lives in Redis, and a runner holds a lease on its
batch: when a gateway stops or dies, any gateway (the same one restarted, or another) adopts the
batch once the lease lapses and finishes it without generating or writing any line twice.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import anyio.from_thread
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from producer.batch.book import BatchRecord, BatchStatus, UnknownBatch
from producer.batch.control import cancel_batch
from producer.gateway.api_keys import Caller
from producer.gateway.batch_runs import BatchSupervisor as BatchSupervisor  # where the app looks
from producer.gateway.errors import ApiError
from producer.gateway.guards import ResourceId
from producer.gateway.quotas import too_many
from producer.gateway.security import CallerDep
from producer.gateway.services import Services, services
from producer.openai_format import CHAT_URL, COMPLETIONS_URL

router = APIRouter(prefix="/v1/batches", tags=["openai batch"])


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: (
        dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None
    ) = Field(default=None, max_length=16)


def batch_object(record: BatchRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint or COMPLETIONS_URL,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input,
        "completion_window": record.completion_window,
        "status": record.status.value,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.created_at + 24 * 3600,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": None,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed + record.cancelled,
        },
        "metadata": record.metadata,
    }


# Plain functions: FastAPI runs them in its thread pool, where blocking Redis calls are fine.
@router.post("", summary="Create a batch from an uploaded file")
def create(body: BatchCreate, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, Any]:
    key = caller.key
    if key is not None and key.max_batches == 0:  # before the file: the answer is the same whatever file is named
        raise ApiError(403, f"API key {key.name!r} may not create batches", "permission_error", code="no_batches")
    source = s.files.get(body.input_file_id, caller)  # another tenant's file reads as one that does not exist
    if source["purpose"] != "batch":
        raise ApiError(400, f"file {body.input_file_id!r} has purpose {source['purpose']!r}, not 'batch'")
    if body.endpoint not in (COMPLETIONS_URL, CHAT_URL):
        raise ApiError(400, f"endpoint {body.endpoint!r} is not supported", param="endpoint")
    batch_id = f"batch_{uuid.uuid4().hex}"
    # This endpoint runs in a worker thread; the allowance lives on the event loop's Redis client.
    if key is not None and not anyio.from_thread.run(s.quotas.batches.reserve, key.name, batch_id, key.max_batches):
        raise too_many(key.name, "batches", key.max_batches)
    book = s.batches.book
    book.create(
        batch_id,
        status=BatchStatus.VALIDATING,
        origin="gateway",
        input=body.input_file_id,
        endpoint=body.endpoint,
        metadata=body.metadata,
        completion_window=body.completion_window,
        tenant=caller.tenant,
    )
    s.files.touch(body.input_file_id)
    s.batches.launch(batch_id)
    return batch_object(book.get(batch_id))


def visible(s: Services, batch_id: str, caller: Caller) -> BatchRecord:
    """The batch if it is the caller's; another tenant's answers as one that does not exist."""
    record = s.batches.book.get(batch_id)
    if not caller.may_see(record.tenant):
        raise UnknownBatch(batch_id)
    return record


@router.get("/{batch_id}", summary="A batch's status and counts")
def retrieve(batch_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, Any]:
    return batch_object(visible(s, batch_id, caller))


@router.get("", summary="List batches, newest first")
def list_batches(
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    tenant = None if caller.sees_all else caller.tenant
    records = s.batches.book.recent(limit=limit + 1, after=after, tenant=tenant)
    data = [batch_object(r) for r in records[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(records) > limit,
    }


@router.post("/{batch_id}/cancel", summary="Cancel a batch: it stops, its queued and running jobs are cancelled")
def cancel(batch_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, Any]:
    visible(s, batch_id, caller)
    return batch_object(cancel_batch(s.client, batch_id, settle_s=0.0))
