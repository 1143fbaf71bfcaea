"""Admission defects of issue #10 ("nothing silently lost or run twice"), on a real redis-server.

Each test failed on the code before its fix: a reused idempotency key answered with another
request's job, a used job id queued again, a list admitted in part, a batch counting a line twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from jobcontract.jobs import IdempotencyConflict
from jobcontract.keys import Keys, queue_name
from jobcontract.models import Backend, Lane
from jobcontract.settings import GenqSettings
from producer.async_client import AsyncClient
from producer.client import Client

QUEUE = queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)


def ask(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4, **extra}


# -- an idempotency key reused with another request -------------------------------------------------
def test_a_reused_idempotency_key_with_another_request_is_refused(
    client: Client, keys: Keys, redis_client: redis.Redis
) -> None:
    first = client.submit(ask("charge card 42", idempotency_key="order-42"))
    # The same request, spelled with a default written out, is the same request: the same job.
    assert client.submit(ask("charge card 42", idempotency_key="order-42", temperature=1.0)) == first
    with pytest.raises(IdempotencyConflict) as refused:
        client.submit(ask("charge card 43", idempotency_key="order-42"))
    assert (refused.value.key, refused.value.job_id) == ("order-42", first)
    assert client.status(first).state.value == "queued"
    assert redis_client.xlen(keys.stream(QUEUE)) == 1
    with pytest.raises(IdempotencyConflict):
        client.submit_many([ask("charge card 42", idempotency_key="order-42", max_tokens=5)])


def test_a_reused_idempotency_key_with_another_request_is_refused_async(
    settings: GenqSettings, keys: Keys, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with AsyncClient(settings) as client:
            first = await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42"))
            assert await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42")) == first
            with pytest.raises(IdempotencyConflict) as refused:
                await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42", seed=7))
            assert (refused.value.key, refused.value.job_id) == ("tenant-a:order-42", first)
            with pytest.raises(IdempotencyConflict):
                await client.submit_many([ask("refund", idempotency_key="tenant-a:order-42")])

    asyncio.run(scenario())
    assert redis_client.xlen(keys.stream(QUEUE)) == 1
