"""Admission, results and cancellation in Redis, on a real redis-server (no worker needed)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from pydantic import ValidationError

from jobcontract.jobs import JobStore, QueueFull, UnknownJob
from jobcontract.keys import Keys, pool_name, queue_name
from jobcontract.models import (
    Backend,
    GenerationResult,
    JobState,
    Lane,
    Timings,
    utc_from_micros,
)
from jobcontract.settings import GenqSettings
from producer.client import Client, GenqUnavailable
from tests.queues import queued as queued_in


def finished(store: JobStore, job_id: str, text: str = "ok") -> GenerationResult:
    status = store.status(job_id)
    return GenerationResult(
        job_id=job_id,
        model=status.model,
        state=JobState.SUCCEEDED,
        text=text,
        timings=Timings(enqueued_at=status.enqueued_at, finished_at=store.now()),
    )


def test_submit_records_the_job_and_queues_it_on_the_first_backend(
    client: Client, keys: Keys, redis_client: redis.Redis
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "hi", "max_tokens": 4})
    status = client.status(job_id)
    assert status.state is JobState.QUEUED
    assert status.queue == queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)
    assert queued_in(redis_client, keys, status.queue) == 1


def test_an_invalid_request_queues_nothing(client: Client, keys: Keys, redis_client: redis.Redis) -> None:
    with pytest.raises(ValidationError):
        client.submit_many([{"model": "tiny", "prompt": "fine"}, {"model": "tiny", "prompt": "x", "max_tokens": -1}])
    assert redis_client.keys(f"{keys.namespace}:*") == []


def test_a_repeated_idempotency_key_returns_the_first_job(
    client: Client, keys: Keys, redis_client: redis.Redis
) -> None:
    first = client.submit({"model": "tiny", "prompt": "a", "idempotency_key": "order-17"})
    again = client.submit({"model": "tiny", "prompt": "a", "idempotency_key": "order-17"})
    assert again == first
    assert queued_in(redis_client, keys, queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)) == 1


def test_a_full_queue_refuses_new_work(settings: GenqSettings) -> None:
    small = Client(settings.model_copy(update={"max_queued_jobs": 2}))
    small.submit({"model": "tiny", "prompt": "1"})
    small.submit({"model": "tiny", "prompt": "2"})
    with pytest.raises(QueueFull):
        small.submit({"model": "tiny", "prompt": "3"})


def test_admission_prefers_a_pool_that_has_live_workers(client: Client, keys: Keys, redis_client: redis.Redis) -> None:
    seconds, micros = redis_client.time()
    alive_until = (int(seconds) + 60) * 1_000_000 + int(micros)
    redis_client.zadd(keys.pool(pool_name("tiny", Backend.LLAMACPP)), {"w1": alive_until})
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    assert client.status(job_id).queue == queue_name("tiny", Backend.LLAMACPP, Lane.INTERACTIVE)


def test_a_waiter_wakes_when_the_result_is_written(client: Client) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    writer = threading.Timer(0.2, lambda: client.store.finish(finished(client.store, job_id, "done!")))
    writer.start()
    result = client.result(job_id, timeout=10)
    writer.join()  # the waiter wakes on the done event, before the writer has read its reply
    assert result.text == "done!"
    assert result.state is JobState.SUCCEEDED


def test_the_first_result_wins(client: Client) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    assert client.store.finish(finished(client.store, job_id, "first"))
    assert not client.store.finish(finished(client.store, job_id, "second"))
    assert client.result(job_id, timeout=1).text == "first"


def test_waiting_past_the_timeout_raises(client: Client) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.result(job_id, timeout=0.3)
    assert time.monotonic() - started < 5


def test_an_unknown_job_is_reported(client: Client) -> None:
    with pytest.raises(UnknownJob):
        client.status("no-such-job")
    with pytest.raises(UnknownJob):
        client.result("no-such-job", timeout=3)


def test_cancelling_a_queued_job_finishes_it_at_once(client: Client) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    assert client.cancel(job_id) is JobState.CANCELLED
    result = client.result(job_id, timeout=1)
    assert result.state is JobState.CANCELLED
    ticket = client.store.start(job_id, "w", Backend.MLX, "q")
    assert ticket is JobState.CANCELLED  # a worker that picks it up later skips it


def test_cancelling_a_running_job_asks_its_worker(client: Client) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    ticket = client.store.start(job_id, "w", Backend.MLX, "q")
    assert not isinstance(ticket, JobState) and ticket is not None
    assert utc_from_micros(ticket.started_us) >= utc_from_micros(ticket.enqueued_us)
    assert client.cancel(job_id) is JobState.RUNNING
    assert client.status(job_id).cancel_requested


def test_an_unreachable_redis_is_one_clear_error(settings: GenqSettings) -> None:
    dead = Client(settings.model_copy(update={"redis_url": "redis://:secret@127.0.0.1:1/0"}))
    with pytest.raises(GenqUnavailable, match="cannot reach Redis") as error:
        dead.submit({"model": "tiny", "prompt": "x"})
    assert "secret" not in str(error.value)
