"""The two kinds of job on real servers: a streamed job (tokens published as they come) and a plain
one nobody streams (one non-streamed completion). Both must survive a frozen server, stop when
cancelled, and give the same text for the same greedy request; only the streamed one has a first
token time."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.models import AttemptOutcome, Backend, JobState
from jobcontract.settings import GenqSettings
from producer import Client
from tests.harness import WorkerHandle, start_worker, wait_until

KINDS = ["streamed", "plain"]
LONG = 3000  # tokens: seconds of generation, so the job is surely still running when it is hit


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=f"k{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module", params=["mlx", "llamacpp"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def worker(
    request: pytest.FixtureRequest, backend: str, settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerHandle]:
    extra = ["--llama-server", request.getfixturevalue("llama_server_binary")] if backend == "llamacpp" else []
    handle = start_worker(
        settings, tmp_path_factory.mktemp(f"kinds-{backend}"), backend=backend, concurrency=2, extra_args=extra
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    c = connect(settings.redis_url)
    yield c
    c.close()


def ask(backend: str, kind: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": kind == "streamed",
        "backend": backend,
        **extra,
    }


def wait_running(db: redis.Redis, keys: Keys, job_id: str, settle_s: float) -> None:
    assert wait_until(lambda: db.hget(keys.job(job_id), "state") == b"running", 60, interval=0.005)
    time.sleep(settle_s)  # into the generation, past the request's setup


def test_plain_and_streamed_give_the_same_text_and_only_streamed_has_a_first_token(
    worker: WorkerHandle, backend: str, settings: GenqSettings
) -> None:
    with Client(settings) as client:
        streamed = client.generate(ask(backend, "streamed", "Once upon a time", 32), timeout=120)
        plain = client.generate(ask(backend, "plain", "Once upon a time", 32), timeout=120)
        pieces = "".join(client.stream(ask(backend, "streamed", "Once upon a time", 32), timeout=120))
    assert streamed.state is plain.state is JobState.SUCCEEDED, (streamed.error, plain.error)
    assert plain.backend is streamed.backend is Backend(backend)
    assert plain.text and plain.text == streamed.text == pieces
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (
        streamed.usage.prompt_tokens,
        streamed.usage.completion_tokens,
    )
    # The same prompt a second time on the same server: all but its last token from the prompt cache.
    assert 0 < plain.usage.prompt_tokens_details.cached_tokens < plain.usage.prompt_tokens
    assert plain.finish_reason == streamed.finish_reason
    assert streamed.timings.first_token_at is not None
    assert plain.timings.first_token_at is None  # a plain completion has no first token to report
    assert plain.timings.generation_s is not None


@pytest.mark.parametrize("kind", KINDS)
def test_a_running_job_of_each_kind_can_be_cancelled(
    worker: WorkerHandle, backend: str, settings: GenqSettings, db: redis.Redis, kind: str
) -> None:
    with Client(settings) as client:
        # The tiny model's context (512 tokens) bounds a job to a fraction of a second on llama-server:
        # a job that finished before the cancel reached it proves nothing, so it is tried again.
        for attempt in range(5):
            job_id = client.submit(ask(backend, kind, f"cancel me {kind} {attempt}", LONG))
            wait_running(db, Keys(settings.namespace), job_id, 0.02)
            client.cancel(job_id)
            result = client.result(job_id, timeout=60)
            if result.state is not JobState.SUCCEEDED:
                break
        after = client.generate(ask(backend, kind, "still serving", 8), timeout=120)
    assert result.state is JobState.CANCELLED
    assert [a.outcome for a in result.attempts] == [AttemptOutcome.CANCELLED]
    assert after.state is JobState.SUCCEEDED, after.error


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_server_is_noticed_and_the_job_of_each_kind_retried(
    worker: WorkerHandle, backend: str, settings: GenqSettings, db: redis.Redis, kind: str
) -> None:
    [server] = worker.server_pids()
    try:
        with Client(settings) as client:
            job_id = client.submit(ask(backend, kind, f"freeze under me {kind}", 600))
            # At once: llama-server with passive OpenMP threads writes 500 tokens in ~0.4 s here.
            wait_running(db, Keys(settings.namespace), job_id, 0.0)
            os.kill(server, signal.SIGSTOP)
            result = client.result(job_id, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGCONT)
    assert result.state is JobState.SUCCEEDED, result.error
    assert len(result.attempts) >= 2
    assert result.attempts[0].outcome in (AttemptOutcome.SERVER_CRASHED, AttemptOutcome.TIMEOUT), result.attempts
    assert result.attempts[-1].outcome is AttemptOutcome.SUCCEEDED
    assert wait_until(lambda: len(worker.server_pids()) == 1 and server not in worker.server_pids(), 60)


def test_llama_server_threads_wait_passively(worker: WorkerHandle, backend: str) -> None:
    """llama-server's OpenMP threads spin between requests unless told to sleep (specs.py)."""
    [server] = worker.server_pids()
    environ = psutil.Process(server).environ()
    if backend == "llamacpp":
        assert environ.get("OMP_WAIT_POLICY") == "passive"
    else:
        assert "OMP_WAIT_POLICY" not in environ
