"""Redis round trips a job costs, counted by the real redis-server (INFO commandstats), not by timing."""

from __future__ import annotations

import asyncio

import redis

from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend, GenerationResult, JobState, Timings
from jobcontract.settings import GenqSettings
from producer import AsyncClient, Client
from workers.circuit import CircuitBreaker


def calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_success_with_no_failure_streak_costs_no_round_trip(redis_client: redis.Redis, keys: Keys) -> None:
    breaker = CircuitBreaker(redis_client, keys, "tiny", threshold=3)
    redis_client.config_resetstat()
    for _ in range(5):
        breaker.record_success(Backend.MLX)
    assert calls(redis_client, "del") == 0


def test_a_success_still_ends_a_streak_and_closes_an_open_circuit(redis_client: redis.Redis, keys: Keys) -> None:
    breaker = CircuitBreaker(redis_client, keys, "tiny", threshold=2)
    streak = keys.circuit(pool_name("tiny", Backend.MLX)) + ":streak"
    breaker.record_failure(Backend.MLX)
    assert redis_client.exists(streak)
    breaker.record_success(Backend.MLX)
    assert not redis_client.exists(streak)

    other = CircuitBreaker(redis_client, keys, "tiny", threshold=2)  # another worker opens the circuit
    other.record_failure(Backend.MLX)
    other.record_failure(Backend.MLX)
    assert breaker.is_open(Backend.MLX)  # this worker sees it open...
    breaker.record_success(Backend.MLX)  # ...and its success closes it
    assert not breaker.is_open(Backend.MLX)


def test_a_waiter_takes_the_result_from_the_done_event_without_reading_the_record(
    client: Client, settings: GenqSettings, redis_client: redis.Redis
) -> None:
    job_ids = client.submit_many([{"model": "tiny", "prompt": f"x{n}"} for n in range(3)])
    for n, job_id in enumerate(job_ids):
        status = client.store.status(job_id)
        result = GenerationResult(
            job_id=job_id,
            model=status.model,
            state=JobState.SUCCEEDED,
            text=f"answer {n}",
            timings=Timings(enqueued_at=status.enqueued_at, finished_at=client.store.now()),
        )
        assert client.store.finish(result)
    redis_client.config_resetstat()
    waited = client.results(job_ids, timeout=10)

    async def wait_async() -> list[GenerationResult]:
        async with AsyncClient(settings) as aclient:
            return await aclient.results(job_ids, timeout=10)

    awaited = asyncio.run(wait_async())
    assert calls(redis_client, "hget") == 0 and calls(redis_client, "hmget") == 0
    assert [r.text for r in waited] == [r.text for r in awaited] == [f"answer {n}" for n in range(3)]
    # The record keeps its result for status and result lookups.
    assert [client.store.result(j).text for j in job_ids] == [f"answer {n}" for n in range(3)]  # type: ignore[union-attr]
