"""The timeout → retry → reroute policy on real servers: an mlx worker, a llama.cpp worker in both
launch styles (the C++ llama-server binary and python -m llama_cpp.server), a real Redis."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobcontract.keys import Keys, pool_name, queue_name
from jobcontract.models import AttemptOutcome, Backend, GenerationRequest, JobState, Lane
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import WorkerHandle, start_worker, wait_until

PROMPT = "The quick brown fox"


@pytest.fixture(params=["llama-server", "llama_cpp.server"])
def llama_style(request: pytest.FixtureRequest) -> list[str]:
    """Extra `genq worker` arguments for each llama.cpp launch style."""
    if request.param == "llama-server":
        return ["--llama-server", request.getfixturevalue("llama_server_binary")]
    return []


@pytest.fixture
def routes_settings(settings: GenqSettings, tmp_path: Path) -> GenqSettings:
    """mlx first with a short first-token timeout and one attempt, then llama.cpp."""
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f"""
[[models]]
name = "tiny"

[[models.backends]]
path = "{settings.models_dir / "tiny-llama"}"
first_token_timeout_s = 1.5
token_timeout_s = 1.5
max_attempts = 1

[[models.backends]]
path = "{settings.models_dir / "tiny-llama.gguf"}"
first_token_timeout_s = 20
token_timeout_s = 20
context_length = 512
"""
    )
    return settings.model_copy(update={"routes_file": routes})


@pytest.fixture
def llama_worker(routes_settings: GenqSettings, tmp_path: Path, llama_style: list[str]) -> Iterator[WorkerHandle]:
    handle = start_worker(routes_settings, tmp_path, backend="llamacpp", concurrency=2, extra_args=llama_style)
    yield handle
    handle.stop()


def ask(**extra: object) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, **extra}
    )


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_frozen_mlx_server_hands_the_job_to_llamacpp(
    routes_settings: GenqSettings, tmp_path: Path, llama_worker: WorkerHandle
) -> None:
    # A long hang timeout keeps the supervisor from restarting the frozen server: the job must
    # leave it on its own first-token timeout.
    mlx = start_worker(routes_settings, tmp_path, env={"GENQ_SERVER_HANG_TIMEOUT_S": "60"})
    servers = mlx.server_pids()
    try:
        with Client(routes_settings) as client:
            reference = client.generate(ask(backend="mlx"), timeout=60)
            assert reference.backend is Backend.MLX
            for pid in servers:
                os.kill(pid, signal.SIGSTOP)
            result = client.generate(ask(), timeout=60)
        assert result.state is JobState.SUCCEEDED, result.error
        assert result.backend is Backend.LLAMACPP
        assert [(a.backend, a.outcome) for a in result.attempts] == [
            (Backend.MLX, AttemptOutcome.TIMEOUT),
            (Backend.LLAMACPP, AttemptOutcome.SUCCEEDED),
        ]
        assert result.text == reference.text  # the GGUF twin, greedy: the same tokens
    finally:
        thaw(servers)
        mlx.stop()


def test_a_killed_mlx_server_mid_job_still_completes_and_comes_back(
    routes_settings: GenqSettings, tmp_path: Path, llama_worker: WorkerHandle
) -> None:
    mlx = start_worker(routes_settings, tmp_path)
    try:
        [server] = mlx.server_pids()
        with Client(routes_settings) as client:
            job_id = client.submit(ask(max_tokens=400, stream=True))
            next(iter(client.store.tokens(job_id, timeout_s=30)))  # it is generating now
            os.kill(server, signal.SIGKILL)
            result = client.result(job_id, timeout=60)
        assert result.state is JobState.SUCCEEDED, result.error
        assert result.attempts[0].backend is Backend.MLX
        assert result.attempts[0].outcome is AttemptOutcome.SERVER_CRASHED  # not charged; retried alone
        assert result.attempts[-1].outcome is AttemptOutcome.SUCCEEDED
        assert wait_until(lambda: len(mlx.server_pids()) == 1 and mlx.server_pids() != [server], 10)
    finally:
        mlx.stop()


def test_with_no_mlx_worker_at_all_jobs_complete_on_llamacpp(
    routes_settings: GenqSettings, llama_worker: WorkerHandle
) -> None:
    with Client(routes_settings) as client:
        results = client.results(client.submit_many([ask(metadata={"n": str(n)}) for n in range(4)]), timeout=60)
    assert all(r.state is JobState.SUCCEEDED for r in results), [r.error for r in results]
    assert {r.backend for r in results} == {Backend.LLAMACPP}
    assert all(len(r.attempts) == 1 for r in results)  # admitted straight to the live pool


def test_jobs_stranded_in_a_dead_pool_are_rescued(
    routes_settings: GenqSettings, tmp_path: Path, llama_style: list[str]
) -> None:
    with Client(routes_settings) as client:
        # No worker anywhere: admission falls back to the route's first backend, mlx.
        job_ids = client.submit_many([ask() for _ in range(3)])
        assert {client.status(j).queue for j in job_ids} == {queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)}
        llama = start_worker(
            routes_settings, tmp_path, backend="llamacpp", extra_args=llama_style, env={"GENQ_RESCUE_AFTER_S": "1"}
        )
        try:
            results = client.results(job_ids, timeout=60)
        finally:
            llama.stop()
    assert {r.backend for r in results} == {Backend.LLAMACPP}
    assert all(r.ok for r in results)


def test_a_request_the_server_refuses_fails_once_without_retry(
    routes_settings: GenqSettings, llama_worker: WorkerHandle, keys: Keys
) -> None:
    too_long = ask(prompt="hello world " * 400, backend="llamacpp")  # over the 512-token context
    with Client(routes_settings) as client:
        result = client.generate(too_long, timeout=60)
        assert client.generate(ask(), timeout=60).ok  # the pool is unharmed
    assert result.state is JobState.FAILED
    assert [a.outcome for a in result.attempts] == [AttemptOutcome.INVALID]
    assert result.error is not None and "context" in result.error.message
    assert client.redis.xlen(keys.dead_letters) == 0


def test_the_circuit_opens_on_a_failing_pool_and_closes_when_it_recovers(
    routes_settings: GenqSettings, tmp_path: Path, llama_worker: WorkerHandle, keys: Keys
) -> None:
    mlx = start_worker(
        routes_settings,
        tmp_path,
        env={"GENQ_SERVER_HANG_TIMEOUT_S": "60", "GENQ_CIRCUIT_THRESHOLD": "2", "GENQ_CIRCUIT_COOL_DOWN_S": "4"},
    )
    servers = mlx.server_pids()
    circuit = keys.circuit(pool_name("tiny", Backend.MLX))
    try:
        with Client(routes_settings) as client:
            for pid in servers:
                os.kill(pid, signal.SIGSTOP)
            for _ in range(2):  # each waits out mlx's first-token timeout, then reroutes
                assert client.generate(ask(), timeout=60).backend is Backend.LLAMACPP
            assert client.redis.exists(circuit)
            # Open: the next job goes straight to llama.cpp without waiting on mlx.
            skipped = client.generate(ask(), timeout=60)
            assert [a.backend for a in skipped.attempts] == [Backend.LLAMACPP]
            thaw(servers)
            assert wait_until(lambda: not client.redis.exists(circuit), 10)
            healed = client.generate(ask(), timeout=60)
        assert healed.backend is Backend.MLX
        assert [a.outcome for a in healed.attempts] == [AttemptOutcome.SUCCEEDED]
    finally:
        thaw(servers)
        mlx.stop()


def test_killing_the_whole_mlx_pool_does_not_stall_its_queue(
    routes_settings: GenqSettings, tmp_path: Path, llama_worker: WorkerHandle
) -> None:
    """Every mlx process SIGKILLed at once (supervisor, worker, server) with jobs running and queued:
    its liveness keys expire on Redis's clock, a live llama.cpp supervisor hands the jobs back and
    moves them to its own pool."""
    mlx = start_worker(routes_settings, tmp_path, concurrency=2, env={"GENQ_LIVENESS_TTL_S": "3"})
    with Client(routes_settings) as client:
        job_ids = client.submit_many([ask(max_tokens=400, backend="mlx") for _ in range(6)])
        assert wait_until(lambda: client.status(job_ids[0]).state is not JobState.QUEUED, 30)
        pool = mlx.worker_pids() + mlx.server_pids() + [mlx.pid]
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        mlx.process.wait()
        results = client.results(job_ids, timeout=90)
    assert all(r.ok for r in results), [r.error for r in results]
    assert Backend.LLAMACPP in {r.backend for r in results}  # the unfinished ones moved
    assert len({r.job_id for r in results}) == 6
