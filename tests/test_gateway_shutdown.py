"""SIGTERM to a real `genq gateway` while callers wait on it: it exits within its grace, a long-poll
and a blocking completion get a retryable 503, a stream is ended and its job cancelled.

The worker is real; its mlx_lm.server is frozen (SIGSTOP) so the jobs stay running for as long
as the test needs, with first-token timeouts no test reaches."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from genq.local_redis import LocalRedis
from jobcontract.keys import Keys
from jobcontract.models import JobState
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.callers import Gateway, job_keys, start_gateway, wait_for
from tests.harness import WorkerHandle, start_worker

GRACE_S = 2.0
MARGIN_S = 20.0  # the lifespan's end and interpreter exit, on a busy 2-core machine


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> GenqSettings:
    routes = tmp_path_factory.mktemp("routes") / "routes.toml"
    routes.write_text(
        f'[[models]]\nname = "tiny"\n\n[[models.backends]]\npath = "{models_dir / "tiny-llama"}"\n'
        "first_token_timeout_s = 300\ntoken_timeout_s = 300\n"
    )
    return GenqSettings(
        redis_url=redis_server.url, namespace=f"s{uuid.uuid4().hex[:10]}", models_dir=models_dir, routes_file=routes
    )


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(
        settings, tmp_path_factory.mktemp("shutdown-worker"), concurrency=4, env={"GENQ_SERVER_HANG_TIMEOUT_S": "600"}
    )
    yield handle
    handle.stop()


@contextlib.contextmanager
def frozen(worker: WorkerHandle) -> Iterator[None]:
    """The worker's server stopped (SIGSTOP): every job it takes stays running until the block ends."""
    servers = worker.server_pids()
    try:
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
def gateway(settings: GenqSettings, tmp_path: Path) -> Iterator[Gateway]:
    handle = start_gateway(settings, tmp_path, GENQ_GATEWAY_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        yield handle
    finally:
        handle.stop(kill=True)


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def open_requests(gateway: Gateway) -> int:
    """Connections the gateway holds open to callers (each of these tests' callers has one)."""
    return sum(
        1
        for c in psutil.Process(gateway.process.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == gateway.port
    )


def running(client: Client, job_id: str) -> bool:
    return client.status(job_id).state is JobState.RUNNING


def running_jobs(client: Client, settings: GenqSettings) -> int:
    keys = job_keys(client.redis, Keys(settings.namespace))
    return sum(client.redis.hget(key, "state") == b"running" for key in keys)


def terminate_within_grace(gateway: Gateway) -> None:
    gateway.process.send_signal(signal.SIGTERM)
    try:
        gateway.process.wait(timeout=GRACE_S + MARGIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway was still running {GRACE_S + MARGIN_S:.0f}s after SIGTERM:\n{gateway.log()}")


def test_sigterm_answers_a_long_poll_and_a_blocking_completion_with_a_retryable_503(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings
) -> None:
    with Client(settings) as client, frozen(worker):
        submitted = httpx.post(
            f"{gateway.url}/v1/genq/jobs", json={"model": "tiny", "prompt": "wait for me", "max_tokens": 8}, timeout=30
        )
        assert submitted.status_code == 202, submitted.text
        polled_job = submitted.json()["job_id"]
        wait_for(lambda: running(client, polled_job), timeout=60)
        long_poll, polled = in_background(
            lambda: httpx.get(f"{gateway.url}/v1/genq/jobs/{polled_job}/result", params={"wait": 60}, timeout=120)
        )
        blocking, completed = in_background(
            lambda: httpx.post(
                f"{gateway.url}/v1/completions",
                json={"model": "tiny", "prompt": "and for me", "max_tokens": 8},
                timeout=120,
            )
        )
        wait_for(lambda: open_requests(gateway) == 2, timeout=30)
        wait_for(lambda: running_jobs(client, settings) >= 2, timeout=60)

        terminate_within_grace(gateway)
        long_poll.join(30)
        blocking.join(30)

        for outcome in (polled, completed):
            assert "error" not in outcome, f"the caller saw {outcome.get('error')!r}, not an answer"
            response: httpx.Response = outcome["value"]
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        # A waiter's job is not the gateway's to end: it runs on, and a retry finds it.
        assert client.status(polled_job).state is JobState.RUNNING
        blocked_job = completed["value"].headers["X-Genq-Job-Id"]
        assert client.status(blocked_job).state is JobState.RUNNING
        for job_id in (polled_job, blocked_job):
            client.cancel(job_id)


def test_sigterm_ends_a_stream_with_an_error_event_and_cancels_its_job(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings
) -> None:
    headers: dict[str, str] = {}
    started = threading.Event()

    def read_stream() -> list[str]:
        body = {"model": "tiny", "prompt": "stream to me", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120) as response:
            headers.update(response.headers)
            started.set()
            return [line for line in response.iter_lines() if line]

    with Client(settings) as client:
        with frozen(worker):
            reader, outcome = in_background(read_stream)
            assert started.wait(60), "the stream never began"
            job_id = headers["x-genq-job-id"]
            wait_for(lambda: running(client, job_id), timeout=60)

            terminate_within_grace(gateway)
            reader.join(30)

            assert "error" not in outcome, f"the stream was cut: {outcome.get('error')!r}"
            events = [json.loads(line[len("data: ") :]) for line in outcome["value"] if line.startswith("data: {")]
            assert events and events[-1]["error"]["code"] == "shutting_down"
            assert "data: [DONE]" not in outcome["value"]
            assert client.status(job_id).cancel_requested
        # The worker aborts the server request as soon as its server moves again, and records it.
        wait_for(lambda: client.status(job_id).state is JobState.CANCELLED, timeout=60)
