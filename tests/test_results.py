"""Final results built in one place (jobcontract/results.py) keep the job's real instants."""

from __future__ import annotations

from pathlib import Path

import redis

from jobcontract.keys import Keys
from jobcontract.models import JobState
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import start_worker


def test_a_job_cancelled_as_its_worker_starts_it_keeps_its_enqueue_time(
    settings: GenqSettings, client: Client, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A job asked to stop while running and then handed back is queued with `cancel_requested`: the
    worker that starts it next finishes it as cancelled without running it. Its result must carry
    the time it was enqueued, not the time it was cancelled."""
    job_id = client.submit({"model": "tiny", "prompt": "stop before you start", "max_tokens": 4})
    enqueued = client.status(job_id).enqueued_at
    redis_client.hset(keys.job(job_id), "cancel_requested", "1")  # as left by a cancel of its earlier run
    worker = start_worker(settings, tmp_path, concurrency=1)
    try:
        result = client.result(job_id, timeout=120)
    finally:
        worker.stop()
    assert result.state is JobState.CANCELLED
    assert result.timings.enqueued_at == enqueued
    assert result.timings.started_at is None
