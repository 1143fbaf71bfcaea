"""The walking skeleton on real parts: a real redis-server, `genq worker` owning a real mlx_lm.server
on the tiny model, and the Python client."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobcontract.keys import Keys
from jobcontract.models import Backend, GenerationRequest, JobState
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import WorkerHandle, alive, start_worker, wait_until


def ask(n: int, **extra: object) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {
            "model": "tiny",
            "prompt": f"prompt number {n}",
            "max_tokens": 16,
            "temperature": 0.0,
            "metadata": {"n": str(n)},
            **extra,
        }
    )


def test_a_result_and_its_timings_come_back(mlx_worker: WorkerHandle, settings: GenqSettings) -> None:
    with Client(settings) as client:
        # Streamed: only a streamed job has a first token to time (a plain one records none).
        result = client.generate(ask(1, stream=True), timeout=60)
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.backend is Backend.MLX
    assert result.text
    assert 0 < result.usage.completion_tokens <= 16
    assert result.usage.prompt_tokens > 0
    t = result.timings
    assert t.started_at is not None and t.first_token_at is not None
    assert t.enqueued_at <= t.started_at <= t.first_token_at <= t.finished_at
    assert result.tokens_per_s is not None and result.tokens_per_s > 0
    assert [a.outcome.value for a in result.attempts] == ["succeeded"]
    assert result.worker is not None and ":tiny.mlx:" in result.worker


def test_chat_requests_are_served_too(mlx_worker: WorkerHandle, settings: GenqSettings) -> None:
    with Client(settings) as client:
        result = client.generate(
            {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.usage.completion_tokens > 0


def test_fifty_concurrent_jobs_all_complete_with_their_own_ids(
    mlx_worker: WorkerHandle, settings: GenqSettings
) -> None:
    with Client(settings) as client:
        job_ids = client.submit_many([ask(n) for n in range(50)])
        results = client.results(job_ids, timeout=120)
    assert len(set(job_ids)) == 50
    assert [r.job_id for r in results] == job_ids
    assert [r.metadata["n"] for r in results] == [str(n) for n in range(50)]
    assert all(r.state is JobState.SUCCEEDED for r in results)
    # Same prompt, temperature 0: the same text whether batched with others or not.
    assert len({r.text for r in results if r.metadata["n"] == "3"}) == 1


def test_greedy_output_does_not_depend_on_batching(mlx_worker: WorkerHandle, settings: GenqSettings) -> None:
    with Client(settings) as client:
        alone = client.generate(ask(7), timeout=60).text
        crowd = client.results(client.submit_many([ask(7) for _ in range(8)]), timeout=60)
    assert {r.text for r in crowd} == {alone}


def test_invalid_requests_are_refused_before_anything_is_queued(
    mlx_worker: WorkerHandle, settings: GenqSettings, keys: Keys
) -> None:
    with Client(settings) as client:
        before = set(client.redis.keys(f"{keys.namespace}:job:*"))
        for bad in (
            {"model": "gpt-17", "prompt": "x"},
            {"model": "tiny", "prompt": "x", "max_tokens": 10**6},
            {"model": "tiny"},
            {"model": "tiny", "prompt": "x", "top_p": 0},
        ):
            with pytest.raises(ValidationError):
                client.submit(bad)
        assert set(client.redis.keys(f"{keys.namespace}:job:*")) == before
        assert client.generate(ask(2), timeout=60).ok  # the worker is unaffected


def test_a_killed_server_is_restarted_and_later_jobs_succeed(mlx_worker: WorkerHandle, settings: GenqSettings) -> None:
    [server] = mlx_worker.server_pids()
    os.kill(server, signal.SIGKILL)
    assert wait_until(lambda: len(mlx_worker.server_pids()) == 1 and mlx_worker.server_pids() != [server], 30)
    with Client(settings) as client:
        results = client.results(client.submit_many([ask(n) for n in range(5)]), timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]


def test_stopping_the_worker_leaves_no_server_behind(settings: GenqSettings, tmp_path: Path) -> None:
    handle = start_worker(settings, tmp_path, processes=2)
    servers = handle.server_pids()
    workers = handle.worker_pids()
    assert len(servers) == 2
    assert handle.stop() == 0
    assert wait_until(lambda: not any(alive(p) for p in servers + workers), 15)
    assert handle.pool_members() == 0


def test_a_sigkilled_worker_leaves_no_orphan_and_is_replaced(settings: GenqSettings, tmp_path: Path) -> None:
    handle = start_worker(settings, tmp_path, processes=1)
    try:
        [worker] = handle.worker_pids()
        [server] = handle.server_pids()
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: not alive(server), 10), "the server outlived its worker"
        assert wait_until(lambda: len(handle.server_pids()) == 1 and handle.worker_pids() != [worker], 60)
        with Client(settings) as client:
            assert client.generate(ask(3), timeout=60).ok
    finally:
        handle.stop()


def test_a_sigkilled_supervisor_takes_its_workers_and_servers_with_it(settings: GenqSettings, tmp_path: Path) -> None:
    handle = start_worker(settings, tmp_path, processes=1)
    processes = handle.worker_pids() + handle.server_pids()
    os.kill(handle.pid, signal.SIGKILL)
    handle.process.wait()
    assert wait_until(lambda: not any(alive(p) for p in processes), 20)
