"""What the endpoints share, built once per app and handed to them through the request."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from fastapi import Request

from jobcontract.jobs import new_job_id
from jobcontract.jobs_async import AsyncJobStore
from jobcontract.models import GenerationRequest
from producer.client import Client
from producer.gateway.api_keys import Caller
from producer.gateway.draining import Drain
from producer.gateway.errors import unknown_model
from producer.gateway.quotas import Quotas, too_many
from producer.gateway.settings import GatewaySettings
from producer.gateway.tenants import JobOwners, scoped_key

if TYPE_CHECKING:
    from producer.gateway.batches import BatchSupervisor
    from producer.gateway.files import FileStore


@dataclass
class Services:
    settings: GatewaySettings
    redis: aioredis.Redis
    store: AsyncJobStore
    client: Client  # sync, for the batch endpoints (run in FastAPI's thread pool) and batch runners
    files: FileStore
    batches: BatchSupervisor
    quotas: Quotas
    drain: Drain = field(default_factory=Drain)  # built in the serving loop, by the lifespan

    def check(self, fields: dict[str, Any]) -> GenerationRequest:
        """Validate against this deployment's limits; an unknown model is a 404, as OpenAI answers."""
        limits = self.settings.limits
        model = fields.get("model")
        if isinstance(model, str) and model not in limits.models:
            raise unknown_model(model, list(limits.models))
        return limits.cap(GenerationRequest.model_validate(fields, context={"limits": limits}))

    @cached_property
    def owners(self) -> JobOwners:
        return JobOwners(self.redis, self.store.keys)

    async def submit(self, request: GenerationRequest, caller: Caller) -> tuple[str, bool]:
        """Queue one job of the caller's tenant within the caller's bound on unfinished jobs; (job id,
        whether an idempotency key of the tenant matched an earlier job)."""
        if request.idempotency_key is not None:
            request = request.model_copy(update={"idempotency_key": scoped_key(caller, request.idempotency_key)})
        job_id, key = new_job_id(), caller.key
        if key is not None and not await self.quotas.jobs.reserve(key.name, job_id, key.max_queued):
            raise too_many(key.name, "jobs", key.max_queued)
        try:
            receipt = await self.store.submit(
                request,
                self.settings.routes.get(request.model),
                default_timeout_s=self.settings.default_timeout_s,
                job_id=job_id,
                tenant=caller.tenant,  # the owner, named in the admission itself: before anyone learns the id
            )
        except BaseException:
            if key is not None:
                await self.quotas.jobs.release(key.name, job_id)
            raise
        if key is not None and receipt.duplicate:  # the earlier job holds its own slot
            await self.quotas.jobs.release(key.name, job_id)
        return receipt.job_id, receipt.duplicate

    def wait_s(self, request: GenerationRequest) -> float:
        return (request.timeout_s or self.settings.default_timeout_s) + 5.0


async def services(request: Request) -> Services:
    """Async so FastAPI calls it on the loop: a plain function would be sent to the thread pool on
    every request (a thread hop per request, a measurable part of the gateway's CPU per job)."""
    found: Services = request.app.state.services
    return found
