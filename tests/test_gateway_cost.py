"""What the gateway spends per job, as promises that can fail (the figures are bench/gateway_cost.py's).

A gateway job is admitted with its owner in one script: the tenant is written by the admission
itself (no second round trip, and no moment, nor a Redis failure, that leaves a job without owner;
the script's own promises are in tests/test_protocol_ops.py). The services dependency runs on the
loop, and uvicorn writes no line per request unless asked. On a real redis-server of this module's
own, so its command counts are the gateway's alone."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect_async
from jobcontract.jobs_async import AsyncJobStore
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from producer.gateway.api_keys import ApiKeyEntry, Caller
from producer.gateway.quotas import Quotas
from producer.gateway.services import Services, services
from producer.gateway.settings import GatewaySettings
from tests.callers import start_gateway


@pytest.fixture(scope="module")
def own_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def count_scripts(db: redis.Redis) -> int:
    stats: dict[str, Any] = db.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


@pytest.mark.parametrize("with_key", [False, True])
def test_a_gateway_job_is_one_admission_script(own_redis: LocalRedis, models_dir: Path, with_key: bool) -> None:
    """Without a key: the admission alone. With one: its quota slot, then the admission (owner included)."""
    settings = GatewaySettings(
        redis_url=own_redis.url,
        namespace=f"ga{int(with_key)}",
        models_dir=models_dir,
        gateway_api_keys=[ApiKeyEntry.model_validate({"key": "k" * 20, "name": "svc", "tenant": "acme"})]
        if with_key
        else [],
    )
    db = redis.Redis.from_url(own_redis.url)
    caller = Caller(key=settings.key_ring.keys[0] if with_key else None)

    async def run() -> str:
        client = connect_async(own_redis.url)
        keys = Keys(settings.namespace)
        store = AsyncJobStore(client, keys, result_ttl_s=60, max_queued=100)
        none = cast(Any, None)  # the sync client, files and batches play no part in a submit
        services = Services(settings, client, store, none, none, none, Quotas.build(client, keys, ttl_s=60))
        request = services.check({"model": "tiny", "prompt": "hi", "max_tokens": 4})
        await services.submit(request, caller)  # registers the scripts (a first EVALSHA may be an EVAL)
        db.config_resetstat()
        job_id, _ = await services.submit(request, caller)
        await client.aclose()
        return job_id

    try:
        job_id = asyncio.run(run())
        assert count_scripts(db) == (2 if with_key else 1)
        assert db.hget(Keys(settings.namespace).job(job_id), "tenant") == caller.tenant.encode()
    finally:
        db.close()


def test_services_are_found_on_the_event_loop() -> None:
    """A plain-function dependency is run in FastAPI's thread pool: a thread hop on every request."""
    assert inspect.iscoroutinefunction(services)


@pytest.mark.parametrize("access_log", [None, "true"])
def test_the_access_log_is_off_unless_asked_for(
    own_redis: LocalRedis, models_dir: Path, tmp_path: Path, access_log: str | None
) -> None:
    """A line per request cost a measurable share of the gateway's CPU per job (docs/performance.md)."""
    settings = GenqSettings(redis_url=own_redis.url, namespace="log", models_dir=models_dir)
    if access_log is None:
        gateway = start_gateway(settings, tmp_path)
    else:
        gateway = start_gateway(settings, tmp_path, GENQ_GATEWAY_ACCESS_LOG=access_log)
    try:
        assert httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code == 200
        time.sleep(0.5)  # the log line, if any, is written after the response
        logged = '"GET /v1/models HTTP/1.1" 200' in gateway.log()
    finally:
        gateway.stop()
    assert logged is (access_log is not None), gateway.log()
