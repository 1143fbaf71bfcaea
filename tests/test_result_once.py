"""A finished job's result is stored once, in its `done` event (finish.lua), and every reader of the
record still finds it: the result, a batch's ends, the async store, and after a stray token."""

from __future__ import annotations

import asyncio

import redis

from jobcontract import results
from jobcontract.connection import connect_async
from jobcontract.jobs import JobStore
from jobcontract.jobs_async import AsyncJobStore
from jobcontract.keys import Keys
from jobcontract.models import Backend, GenerationResult, Timings, Usage
from jobcontract.settings import GenqSettings
from producer.client import Client


def finish(store: JobStore, job_id: str, text: str) -> tuple[bool, GenerationResult]:
    status = store.status(job_id)
    done = results.succeeded(
        job_id,
        status.model,
        text=text,
        finish_reason="length",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        backend=Backend.MLX,
        worker="result-test",
        attempts=[],
        timings=Timings(enqueued_at=status.enqueued_at, finished_at=store.now()),
        metadata={},
    )
    return store.finish(done), done


def started_job(settings: GenqSettings, store: JobStore) -> str:
    with Client(settings) as client:
        job_id = client.submit({"model": "tiny", "prompt": "p", "max_tokens": 8})
    store.start(job_id, "result-test", Backend.MLX, store.status(job_id).queue)
    return job_id


def make_store(redis_client: redis.Redis, keys: Keys, settings: GenqSettings) -> JobStore:
    return JobStore(redis_client, keys, result_ttl_s=settings.result_ttl_s, max_queued=settings.max_queued_jobs)


def test_the_record_names_the_done_event_instead_of_copying_the_result(
    settings: GenqSettings, redis_client: redis.Redis, keys: Keys
) -> None:
    store = make_store(redis_client, keys, settings)
    job_id = started_job(settings, store)
    finished, done = finish(store, job_id, "x" * 500)
    assert finished
    record = redis_client.hgetall(keys.job(job_id))
    assert b"result" not in record and b"result_at" in record
    events: list[tuple[bytes, dict[bytes, bytes]]] = redis_client.xrange(keys.events(job_id))  # type: ignore[assignment]
    [(event_id, fields)] = events
    assert event_id == record[b"result_at"] and fields[b"type"] == b"done"
    assert store.result(job_id) == done
    [end] = store.ends([job_id], mark="written")
    assert end.result == done and end.state is not None and not end.marked


def test_only_the_first_finish_counts_and_its_result_stays(
    settings: GenqSettings, redis_client: redis.Redis, keys: Keys
) -> None:
    store = make_store(redis_client, keys, settings)
    job_id = started_job(settings, store)
    first_ok, first = finish(store, job_id, "first")
    second_ok, _ = finish(store, job_id, "second")
    assert first_ok and not second_ok
    assert store.result(job_id) == first
    assert redis_client.xlen(keys.events(job_id)) == 1


def test_a_token_published_after_the_done_event_does_not_hide_the_result(
    settings: GenqSettings, redis_client: redis.Redis, keys: Keys
) -> None:
    store = make_store(redis_client, keys, settings)
    job_id = started_job(settings, store)
    _, done = finish(store, job_id, "the text")
    store.publish_token(job_id, 0, "late")  # a stray attempt still streaming after another finished the job
    assert store.result(job_id) == done
    assert store.ends([job_id], mark="written")[0].result == done

    async def read() -> GenerationResult | None:
        client = connect_async(settings.redis_url)
        try:
            async_store = AsyncJobStore(
                client, keys, result_ttl_s=settings.result_ttl_s, max_queued=settings.max_queued_jobs
            )
            return await async_store.result(job_id)
        finally:
            await client.aclose()

    assert asyncio.run(read()) == done


def test_an_unfinished_job_has_no_result(settings: GenqSettings, redis_client: redis.Redis, keys: Keys) -> None:
    store = make_store(redis_client, keys, settings)
    job_id = started_job(settings, store)
    store.publish_token(job_id, 0, "a")
    assert store.result(job_id) is None
    assert store.ends([job_id], mark="written")[0].result is None
