"""The gateway's FastAPI app: routers, error shapes, body bound, metrics, and the shared services."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry

from jobcontract.jobs_async import AsyncJobStore, connect_async
from producer.client import Client
from producer.gateway import batches, completions, errors, files, jobs
from producer.gateway.batches import BatchSupervisor
from producer.gateway.files import FileStore
from producer.gateway.guards import BodyLimit
from producer.gateway.quotas import Quotas
from producer.gateway.security import authenticate
from producer.gateway.services import Services
from producer.gateway.settings import GatewaySettings
from producer.gateway.tenants import publish_shares
from producer.gateway_metrics import instrument

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Client(settings)
        publish_shares(client.redis, client.store.keys, settings.key_ring.shares)
        async_redis = connect_async(settings.redis_url, patience_s=settings.gateway_redis_patience_s)
        file_store = FileStore(client.redis, client.store.keys, ttl_s=settings.result_ttl_s)
        supervisor = BatchSupervisor(client, file_store, max_lines=settings.gateway_max_batch_lines)
        app.state.services = Services(
            settings=settings,
            redis=async_redis,
            store=AsyncJobStore(
                async_redis,
                client.store.keys,
                result_ttl_s=settings.result_ttl_s,
                max_queued=settings.max_queued_jobs,
            ),
            client=client,
            files=file_store,
            batches=supervisor,
            quotas=Quotas.build(async_redis, client.store.keys, ttl_s=settings.result_ttl_s),
        )
        supervisor.start()
        try:
            yield
        finally:
            supervisor.stop()
            await async_redis.aclose()
            client.close()

    app = FastAPI(
        title="genq gateway",
        version="1",
        summary="OpenAI-compatible completions, chat and batches, and genq's job endpoints, through the queue.",
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
    )
    errors.install(app)
    for module in (completions, jobs, files, batches):
        app.include_router(module.router)
    app.add_middleware(
        BodyLimit, max_bytes=settings.gateway_max_body_bytes, max_file_bytes=settings.gateway_max_file_bytes
    )
    instrument(app, registry or CollectorRegistry())
    return app
