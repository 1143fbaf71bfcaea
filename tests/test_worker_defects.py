"""Worker-side ways to lose a job or run it twice (issue #10), each reproduced on real parts: a private
redis-server restarted for real, real `genq worker` processes, real mlx_lm.server and llama.cpp
servers killed and frozen from outside.

1. Redis away while a worker decides what follows a failed attempt.
2. A server killed from outside while a suspect job runs alone on it; a poison job with another
   backend to go to.
3. A worker stopped gracefully while its jobs run longer than the liveness TTL.
4. The time between a job's start and its request to the server: cancel and deadline.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from prometheus_client import CollectorRegistry

from genq.local_redis import LocalRedis
from jobcontract.broker import LeavePending, StreamsBroker
from jobcontract.connection import connect
from jobcontract.jobs import JobStore
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.models import Attempt, AttemptOutcome, Backend, GenerationRequest, JobState
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.faults import (
    POISON_MARKER,
    POISON_SITE,
    answers,
    attempts_generating,
    collect,
    done_entries,
    freeze,
    held_message,
    pending_jobs,
    server_of,
    starts,
    thaw,
    wait_for,
    worker_processes,
    write_routes,
)
from tests.harness import WorkerHandle, alive, start_worker
from tests.queues import entries
from workers import rerouting
from workers.circuit import CircuitBreaker
from workers.metrics import WorkerMetrics
from workers.runner import AttemptFailed

StartWorker = Callable[..., WorkerHandle]


def ask(prompt: str, max_tokens: int = 32, **extra: Any) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    )


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def defect_redis() -> Iterator[LocalRedis]:
    """This module's own redis-server (AOF on): tests here stop and restart it."""
    with LocalRedis(appendonly=True) as server:
        yield server


@pytest.fixture
def settings(defect_redis: LocalRedis, namespace: str, models_dir: Path) -> GenqSettings:
    if defect_redis.process is None:
        defect_redis.start()
    return GenqSettings(redis_url=defect_redis.url, namespace=namespace, models_dir=models_dir)


@pytest.fixture
def raw(defect_redis: LocalRedis) -> Iterator[redis.Redis]:
    if defect_redis.process is None:
        defect_redis.start()
    client = connect(defect_redis.url)
    yield client
    client.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[StartWorker]:
    """Start `genq worker`s; every one is stopped at the end, also when its own start failed."""
    started: list[WorkerHandle] = []

    def start(settings: GenqSettings, **kwargs: Any) -> WorkerHandle:
        handle = start_worker(settings, tmp_path, wait=False, **kwargs)
        started.append(handle)
        handle.wait_ready()
        return handle

    yield start
    for handle in started:
        handle.stop()


def routed(settings: GenqSettings, tmp_path: Path, *, mlx: str = "", llamacpp: str = "") -> GenqSettings:
    routes = write_routes(
        tmp_path / f"routes-{uuid.uuid4().hex[:6]}.toml", settings.models_dir, mlx=mlx, llamacpp=llamacpp
    )
    return settings.model_copy(update={"routes_file": routes})


def running(raw: redis.Redis, keys: Keys, job_id: str) -> bool:
    return raw.hget(keys.job(job_id), "state") == b"running"


# -- 1. Redis away while the next step of a failed attempt is decided ------------------------------------
def _fail_an_attempt_while_redis_is_down(
    settings: GenqSettings,
    tmp_path: Path,
    workers: StartWorker,
    defect_redis: LocalRedis,
    raw: redis.Redis,
    client: Client,
    env: dict[str, str],
) -> str:
    """A long job times out on a frozen mlx server (token timeout 2 s) while Redis is down for longer
    than that: the worker decides its retry during the outage. Returns the job id."""
    settings = routed(settings, tmp_path, mlx="first_token_timeout_s = 2\ntoken_timeout_s = 2")
    # No server restart and no liveness expiry during the outage: only the decision meets it.
    worker = workers(
        settings, env={"GENQ_SERVER_HANG_TIMEOUT_S": "600", "GENQ_LIVENESS_TTL_S": "60", **env}, concurrency=2
    )
    [process] = worker_processes(worker)
    keys = Keys(settings.namespace)
    job_id = client.submit(ask("decided during an outage", max_tokens=4000))
    assert wait_for(lambda: running(raw, keys, job_id), 60) is not None
    defect_redis.stop()
    try:
        freeze(process.server_pid)
        time.sleep(6.0)  # the attempt times out after 2 s; its next step is decided with Redis away
    finally:
        defect_redis.start()
        thaw(process.server_pid)
    return job_id


def test_an_entry_left_pending_is_not_acked_and_comes_back_to_its_consumer(raw: redis.Redis, keys: Keys) -> None:
    queue = "tiny.mlx.interactive"
    broker = StreamsBroker(raw, keys, consumer_name="w1", middleware=[])
    broker.declare_queue(queue)
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(1,), kwargs={}, options={}))
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    message = next(consumer)
    assert message is not None
    message.stuff_exception(LeavePending("its next step could not be decided"))
    consumer.ack(message)
    assert raw.xpending(keys.stream(queue), CONSUMER_GROUP)["pending"] == 1  # not acked, not requeued
    again: list[dramatiq.MessageProxy] = []

    def taken_back() -> bool:
        delivered = next(consumer)
        if delivered is not None:
            again.append(delivered)
        return bool(again)

    assert wait_for(taken_back, 15) is not None
    assert again[0].message_id == message.message_id
    consumer.ack(again[0])
    assert raw.xpending(keys.stream(queue), CONSUMER_GROUP)["pending"] == 0


def test_a_redis_restart_while_a_retry_is_decided_loses_nothing(
    settings: GenqSettings,
    tmp_path: Path,
    workers: StartWorker,
    defect_redis: LocalRedis,
    raw: redis.Redis,
    client: Client,
    keys: Keys,
) -> None:
    job_id = _fail_an_attempt_while_redis_is_down(settings, tmp_path, workers, defect_redis, raw, client, env={})
    result = client.result(job_id, timeout=90)
    assert result.ok, result.error
    assert [a.outcome for a in result.attempts] == [AttemptOutcome.TIMEOUT, AttemptOutcome.SUCCEEDED]
    assert done_entries(raw, keys, job_id) == 1


def test_a_decision_that_cannot_be_made_leaves_the_job_to_be_delivered_again(
    settings: GenqSettings,
    tmp_path: Path,
    workers: StartWorker,
    defect_redis: LocalRedis,
    raw: redis.Redis,
    client: Client,
    keys: Keys,
) -> None:
    """With a patience shorter than the outage the decision gives up: the entry must stay pending and
    come back to run again, never be acked."""
    job_id = _fail_an_attempt_while_redis_is_down(
        settings, tmp_path, workers, defect_redis, raw, client, env={"GENQ_REDIS_OUTAGE_PATIENCE_S": "1"}
    )
    result = client.result(job_id, timeout=90)
    assert result.ok, result.error
    assert done_entries(raw, keys, job_id) == 1
    assert starts(raw, keys, job_id) == 2  # delivered again to the worker that held it


# -- 2. a server killed from outside is not proof of poison ----------------------------------------------
def test_a_server_killed_twice_under_a_healthy_job_does_not_dead_letter_it(
    settings: GenqSettings, tmp_path: Path, workers: StartWorker, raw: redis.Redis, client: Client, keys: Keys
) -> None:
    """The server is SIGKILLed under the job while it shares the server, then again while it reruns
    alone: an operator or the OOM killer, not the job."""
    settings = routed(settings, tmp_path, mlx="first_token_timeout_s = 120\ntoken_timeout_s = 30")
    worker = workers(settings, concurrency=4)
    [process] = worker_processes(worker)
    job_id = client.submit(ask("an innocent bystander", max_tokens=4000, stream=True))
    for generating in (1, 2):
        assert wait_for(lambda n=generating: attempts_generating(raw, keys, job_id) >= n, 120) is not None
        if generating == 2:
            message = held_message(raw, keys, job_id)
            assert message is not None and message.kwargs.get("solo") is True, "the rerun is not running alone"
        server = server_of(process.pid)
        assert server is not None
        os.kill(server[0], signal.SIGKILL)
    result = client.result(job_id, timeout=180)
    assert result.ok, result.error
    assert [(a.outcome, a.solo) for a in result.attempts] == [
        (AttemptOutcome.SERVER_CRASHED, False),
        (AttemptOutcome.SERVER_CRASHED, True),
        (AttemptOutcome.SUCCEEDED, False),
    ]
    assert not any(job_id.encode() in fields[b"m"] for _id, fields in raw.xrange(keys.dead_letters))


def test_a_job_that_kills_mlx_runs_on_llamacpp_before_it_is_dead_lettered(
    settings: GenqSettings, tmp_path: Path, workers: StartWorker, raw: redis.Redis, client: Client, keys: Keys
) -> None:
    """The poison hook crashes mlx_lm.server only: on llama.cpp the same prompt is fine."""
    settings = routed(settings, tmp_path, mlx="first_token_timeout_s = 120")
    poison_env = {"PYTHONPATH": os.pathsep.join(p for p in (str(POISON_SITE), os.environ.get("PYTHONPATH", "")) if p)}
    workers(settings, env=poison_env, concurrency=4)
    workers(settings, backend="llamacpp", concurrency=2)
    job_id = client.submit(ask(f"please {POISON_MARKER} now", max_tokens=16))
    result = client.result(job_id, timeout=240)
    assert result.ok, result.error
    assert result.backend is Backend.LLAMACPP
    crashes = [a for a in result.attempts if a.outcome is AttemptOutcome.SERVER_CRASHED]
    assert all(a.backend is Backend.MLX for a in crashes) and sum(a.solo for a in crashes) == 2
    assert raw.xlen(keys.dead_letters) == 0


# -- 3. a graceful stop keeps its jobs -------------------------------------------------------------------
def test_a_graceful_stop_keeps_vouching_so_no_job_runs_twice(
    settings: GenqSettings, workers: StartWorker, raw: redis.Redis, client: Client, keys: Keys
) -> None:
    """A worker draining long jobs after SIGTERM must stay alive in Redis for as long as it runs: with a
    2 s liveness TTL and a second worker in the pool, an expired key hands its jobs to the other."""
    ttl = {"GENQ_LIVENESS_TTL_S": "2"}
    workers(settings, env=ttl, concurrency=4)
    leaving = workers(settings, env={**ttl, "GENQ_SHUTDOWN_GRACE_S": "240"}, concurrency=4)
    [process] = worker_processes(leaving)
    job_ids: list[str] = []
    in_flight: list[str] = []

    def leaver_runs_two() -> bool:
        held = pending_jobs(raw, keys).get(process.consumer, [])
        in_flight[:] = [j for j in held if running(raw, keys, j)]
        return len(in_flight) >= 2

    for round_ in range(20):
        job_ids += client.submit_many([ask(f"drained {round_}.{n}", max_tokens=2000) for n in range(4)])
        if wait_for(leaver_runs_two, 5, interval=0.01) is not None:
            break
    assert len(in_flight) >= 2, "the leaving worker never ran two jobs at once"
    code = leaving.stop(timeout=300)
    results, _ = collect(client, job_ids, timeout=300)
    assert code == 0
    assert not alive(process.pid)
    assert len(results) == len(job_ids) and all(r.ok for r in results.values())
    assert {j: starts(raw, keys, j) for j in in_flight} == dict.fromkeys(in_flight, 1), "a drained job ran twice"
    assert all(results[j].worker == process.consumer for j in in_flight)
    assert all(done_entries(raw, keys, j) == 1 for j in job_ids)


# -- 4. from a job's start to its request: cancel and deadline hold ---------------------------------------
def test_a_job_cancelled_while_its_server_restarts_is_cancelled(
    settings: GenqSettings, tmp_path: Path, workers: StartWorker, raw: redis.Redis, client: Client, keys: Keys
) -> None:
    settings = routed(settings, tmp_path, mlx="first_token_timeout_s = 120")
    worker = workers(settings, concurrency=2)
    [process] = worker_processes(worker)
    os.kill(process.server_pid, signal.SIGKILL)
    job_id = client.submit(ask("cancelled while waiting for the server", max_tokens=64))
    assert wait_for(lambda: running(raw, keys, job_id), 30, interval=0.005) is not None
    assert client.cancel(job_id) is JobState.RUNNING
    restarted = server_of(process.pid)
    assert restarted is None or not answers(restarted[1]), "the server was back before the cancel: no test"
    result = client.result(job_id, timeout=120)
    assert result.state is JobState.CANCELLED, (result.state, result.timings)


def test_the_deadline_holds_while_a_job_waits_behind_suspects_and_timings_are_true(
    settings: GenqSettings, tmp_path: Path, workers: StartWorker, raw: redis.Redis, client: Client, keys: Keys
) -> None:
    """After a crash the jobs it hit rerun alone, one at a time; a job arriving then waits at the gate.
    Its deadline counts from its start, and every result's finish is when it really finished."""
    settings = routed(settings, tmp_path, mlx="first_token_timeout_s = 120\ntoken_timeout_s = 30")
    worker = workers(settings, concurrency=4)
    [process] = worker_processes(worker)
    suspects = client.submit_many([ask(f"suspect {n}", max_tokens=1500, stream=True) for n in range(3)])
    assert wait_for(lambda: all(attempts_generating(raw, keys, j) for j in suspects), 120) is not None
    os.kill(process.server_pid, signal.SIGKILL)
    assert wait_for(lambda: any(starts(raw, keys, j) == 2 for j in suspects), 60, interval=0.005) is not None
    late = client.submit(ask("waits behind the suspects", max_tokens=8, timeout_s=2))
    results, _ = collect(client, [*suspects, late], timeout=240)
    assert len(results) == 4
    assert all(results[j].ok for j in suspects), [results[j].error for j in suspects]
    assert results[late].state is JobState.FAILED, results[late]
    assert results[late].error is not None and "deadline" in results[late].error.message
    for job_id, result in results.items():
        really_finished_us = int(raw.hget(keys.job(job_id), "finished_us") or 0)
        recorded_us = result.timings.finished_at.timestamp() * 1e6
        # The result is built just before it is recorded: a second apart is a lie, not a delay.
        assert really_finished_us - recorded_us < 1_000_000, (job_id, result.timings, result.attempts)


# -- a bug while deciding is not an outage --------------------------------------------------------------
def test_a_bug_while_deciding_dead_letters_the_job_instead_of_redelivering_it_forever(
    settings: GenqSettings, raw: redis.Redis, client: Client, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving the entry pending is right for an outage (the next delivery may decide); for a bug it
    would fail the same way every second, forever. The job must end failed, filed under dead letters."""

    def broken_decide(**_: Any) -> Any:
        raise ValueError("a bug in the policy")

    monkeypatch.setattr(rerouting, "decide", broken_decide)
    job_id = client.submit(ask("a job whose retry decision hits a bug"))
    message = held_message_or_queued(raw, keys, job_id)
    store = JobStore(raw, keys, result_ttl_s=600, max_queued=100)
    middleware = rerouting.Rerouting(
        store=store,
        route=settings.routes.get("tiny"),
        backend=Backend.MLX,
        circuit=CircuitBreaker(raw, keys, "tiny"),
        metrics=WorkerMetrics("tiny", "mlx", registry=CollectorRegistry()),
        worker_name="test-worker",
    )
    attempt_started = store.start(job_id, "test-worker", Backend.MLX, message.queue_name)
    assert not isinstance(attempt_started, JobState | None)
    failed = AttemptFailed(
        Attempt(
            backend=Backend.MLX,
            worker="test-worker",
            outcome=AttemptOutcome.SERVER_ERROR,
            started_at=store.now(),
            duration_s=0.1,
            error="500 from the server",
        ),
        retryable=True,
        deadline_us=attempt_started.deadline_us,
        enqueued_us=attempt_started.enqueued_us,
    )
    proxy = dramatiq.MessageProxy(message)
    middleware.after_process_message(StreamsBroker(raw, keys), proxy, exception=failed)

    assert not isinstance(getattr(proxy, "_exception", None), LeavePending), "a bug must not leave it pending"
    assert proxy.failed, "the consumer's nack files it under dead letters"
    result = client.result(job_id, timeout=5)
    assert result.state is JobState.FAILED
    assert "a bug in the policy" in (result.error.message if result.error else "")


def held_message_or_queued(raw: redis.Redis, keys: Keys, job_id: str) -> dramatiq.Message[object]:
    """The job's dramatiq message, read from its queue's stream (nobody has taken it yet)."""
    for queue in raw.smembers(keys.queues):
        for _id, fields in entries(raw, keys, queue.decode()):
            message = dramatiq.Message.decode(fields[b"m"])
            if message.message_id == job_id:
                return message
    raise AssertionError(f"job {job_id} is in no queue")
