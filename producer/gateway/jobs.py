"""genq's own job endpoints: submit without waiting, then poll status, fetch the result, or cancel;
each on the caller's tenant's jobs only (producer/gateway/tenants.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse

from jobcontract.models import GenerationRequest, GenerationResult, JobStatus
from producer.gateway.guards import ResourceId
from producer.gateway.security import CallerDep
from producer.gateway.services import Services, services

router = APIRouter(prefix="/v1/genq/jobs", tags=["genq jobs"])


@router.post("", status_code=202, summary="Queue a job and return its id at once")
async def submit(
    body: GenerationRequest,
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)] = None,
) -> dict[str, Any]:
    fields = body.model_dump(mode="json", exclude_unset=True)
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    request = s.check(fields)
    job_id, duplicate = await s.submit(request, caller)
    return {
        "job_id": job_id,
        "duplicate": duplicate,
        "status_url": f"/v1/genq/jobs/{job_id}",
        "result_url": f"/v1/genq/jobs/{job_id}/result",
    }


@router.get("/{job_id}", summary="Where a job is now")
async def status(job_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> JobStatus:
    await s.owners.check(job_id, caller)
    return await s.store.status(job_id)


@router.get(
    "/{job_id}/result",
    summary="A job's result; 202 with its status while it is not finished",
    responses={202: {"model": JobStatus}},
)
async def result(
    job_id: ResourceId,
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for the result before answering 202.")] = 0.0,
) -> Any:
    await s.owners.check(job_id, caller)
    if wait > 0:
        try:
            return await s.drain.race(s.store.wait(job_id, min(wait, s.settings.gateway_max_wait_s)))
        except TimeoutError:
            pass
    found: GenerationResult | None = await s.store.result(job_id)
    if found is not None:
        return found
    current = await s.store.status(job_id)
    return JSONResponse(current.model_dump(mode="json"), status_code=202)


@router.post("/{job_id}/cancel", summary="Cancel a queued job (it never runs) or a running one (aborted)")
async def cancel(job_id: ResourceId, s: Annotated[Services, Depends(services)], caller: CallerDep) -> dict[str, str]:
    await s.owners.check(job_id, caller)
    state = await s.store.cancel(job_id)
    return {"job_id": job_id, "state": state.value}


__all__ = ["router"]
