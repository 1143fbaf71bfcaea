"""Job controls on real parts: idempotency, cancelling queued and running jobs, interactive work ahead
of a large batch, backpressure (QueueFull and HTTP 429), and the asyncio client with the same surface."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.jobs import QueueFull
from jobcontract.keys import Keys
from jobcontract.models import AttemptOutcome, JobState
from jobcontract.settings import GenqSettings
from producer import AsyncClient, Client, GenqUnavailable
from producer.batch.book import BatchRecord, BatchStatus
from tests.callers import batch_line, free_port, job_keys, job_starts, read_jsonl, start_gateway, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker

LONG = 4000  # tokens: many seconds of generation for the tiny model, so a job is surely still running


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=f"c{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, tmp_path_factory.mktemp("controls-worker"), concurrency=2)
    yield handle
    handle.stop()


@pytest.fixture
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    c = connect(settings.redis_url)
    yield c
    c.close()


def ask(prompt: str, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_a_repeated_idempotency_key_returns_the_first_job_and_generates_once(
    worker: WorkerHandle, client: Client, db: redis.Redis, settings: GenqSettings
) -> None:
    key = f"order-{uuid.uuid4().hex}"
    first = client.submit(ask("pay once", idempotency_key=key))
    second = client.submit(ask("pay once", idempotency_key=key))
    result = client.result(first, timeout=60)
    third = client.submit(ask("pay once", idempotency_key=key))  # after it finished, too
    assert first == second == third
    assert result.ok
    assert job_starts(db, Keys(settings.namespace))[first] == 1


def test_cancelling_a_queued_job_means_it_never_runs(
    worker: WorkerHandle, client: Client, db: redis.Redis, settings: GenqSettings
) -> None:
    # Two slots, a prefetch of four: the seventh job waits in Redis behind six long ones.
    blockers = client.submit_many([ask(f"block {i}", LONG) for i in range(6)])
    target = client.submit(ask("never"))
    assert client.cancel(target) is JobState.CANCELLED
    result = client.result(target, timeout=5)
    assert result.state is JobState.CANCELLED and result.timings.started_at is None
    for job_id in blockers:
        client.cancel(job_id)
    finished = client.results(blockers, timeout=120)
    assert all(r.state in (JobState.CANCELLED, JobState.SUCCEEDED) for r in finished)
    assert client.generate(ask("after"), timeout=60).ok  # the queue moved past the cancelled job
    assert job_starts(db, Keys(settings.namespace))[target] == 0
    assert client.status(target).state is JobState.CANCELLED


def test_cancelling_a_running_job_aborts_it_and_frees_its_slot(worker: WorkerHandle, client: Client) -> None:
    running = [client.submit(ask(f"run {i}", LONG, stream=True)) for i in range(2)]
    for job_id in running:  # both slots busy, generating
        wait_for(lambda j=job_id: client.redis.xlen(client.store.keys.events(j)) > 3, 60)
        assert client.status(job_id).state is JobState.RUNNING
    assert [client.cancel(j) for j in running] == [JobState.RUNNING, JobState.RUNNING]
    for result in client.results(running, timeout=60):
        assert result.state is JobState.CANCELLED
        assert result.attempts[-1].outcome is AttemptOutcome.CANCELLED
        assert result.timings.started_at is not None
    # Both slots are free again: two new jobs run at once and finish.
    after = client.results(client.submit_many([ask("next 1"), ask("next 2")]), timeout=60)
    assert all(r.ok for r in after)


def test_a_live_request_finishes_ahead_of_a_large_queued_batch(
    worker: WorkerHandle, client: Client, settings: GenqSettings, tmp_path: Path
) -> None:
    total = 300
    source = write_jsonl(tmp_path / "big.jsonl", [batch_line(f"b{i}", max_tokens=48) for i in range(total)])
    records: list[BatchRecord] = []
    runner = threading.Thread(
        target=lambda: records.append(client.batch(source, tmp_path / "out.jsonl")), name="batch", daemon=True
    )
    runner.start()
    book = client.batch_book()

    def batch_id() -> str | None:
        for raw in client.redis.zrevrange(client.store.keys.batches, 0, 5):
            record = book.get(raw.decode())
            if record.input == str(source.resolve()) and record.submitted == total:
                return record.id
        return None

    batch = wait_for(batch_id, 60)
    live = client.generate(ask("I am a live caller"), timeout=120)
    status = client.batch_status(batch)
    assert live.ok
    assert status.finished < total // 2, f"the live request waited for {status.finished} batch lines"
    assert status.in_flight > total // 4
    cancelled = client.batch_cancel(batch)
    assert cancelled.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    runner.join(120)
    assert not runner.is_alive() and records[0].status is BatchStatus.CANCELLED
    written = read_jsonl(tmp_path / "out.jsonl") + read_jsonl(tmp_path / "out.errors.jsonl")
    assert len(written) == len({line["custom_id"] for line in written}) == records[0].submitted


def test_a_full_queue_is_refused_with_queue_full_and_http_429(
    settings: GenqSettings, redis_server: LocalRedis, db: redis.Redis, tmp_path: Path
) -> None:
    # A namespace no worker serves, bounded at three queued jobs.
    bounded = settings.model_copy(update={"namespace": f"full{uuid.uuid4().hex[:8]}", "max_queued_jobs": 3})
    keys = Keys(bounded.namespace)
    with Client(bounded) as small:
        small.submit_many([ask(f"q{i}") for i in range(3)])
        with pytest.raises(QueueFull, match="is full; retry after"):
            small.submit(ask("one too many"))
    assert len(job_keys(db, keys)) == 3
    gateway = start_gateway(bounded, tmp_path)
    try:
        response = httpx.post(f"{gateway.url}/v1/completions", json=ask("http"), timeout=10)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
        assert httpx.post(f"{gateway.url}/v1/genq/jobs", json=ask("job"), timeout=10).status_code == 429
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        gateway.stop()
    assert len(job_keys(db, keys)) == 3


def test_the_async_client_has_the_same_surface(worker: WorkerHandle, settings: GenqSettings, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"a{i}") for i in range(4)])

    async def scenario() -> None:
        async with AsyncClient(settings) as client:
            result = await client.generate(ask("async hello"), timeout=60)
            assert result.ok and result.text
            streamed = "".join([piece async for piece in client.stream(ask("async hello"), timeout=60)])
            assert streamed == result.text
            ids = await client.submit_many([ask(f"many {i}") for i in range(5)])
            results = await client.results(ids, timeout=60)
            assert [r.job_id for r in results] == ids and all(r.ok for r in results)
            key = f"async-{uuid.uuid4().hex}"
            assert await client.submit(ask("same", idempotency_key=key)) == await client.submit(
                ask("same", idempotency_key=key)
            )
            long_id = await client.submit(ask("long", LONG))
            await asyncio.sleep(0.2)
            assert (await client.status(long_id)).state in (JobState.QUEUED, JobState.RUNNING)
            assert await client.cancel(long_id) in (JobState.CANCELLED, JobState.RUNNING)
            assert (await client.result(long_id, timeout=60)).state is JobState.CANCELLED
            record = await client.batch(source, tmp_path / "out.jsonl")
            assert record.status is BatchStatus.COMPLETED and record.completed == 4
            assert (await client.batch_status(record.id)).completed == 4
        async with AsyncClient(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})) as down:
            with pytest.raises(GenqUnavailable):
                await down.submit(ask("nowhere"))

    asyncio.run(scenario())
    assert sorted(json.loads(line)["custom_id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()) == [
        f"a{i}" for i in range(4)
    ]
