"""The job protocol through both stores and both clients, on a real redis-server: one scenario,
parametrized over JobStore/AsyncJobStore (and Client/AsyncClient), so that a change to one side
alone fails here. The worker's half is played by the sync JobStore's own worker calls (start,
publish_token, finish), the same calls a real worker makes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import openai
import pytest
import redis
from pydantic import ValidationError

from jobcontract import results
from jobcontract.jobs import JobStore, UnknownJob
from jobcontract.jobs_async import AsyncJobStore, connect_async
from jobcontract.keys import Keys
from jobcontract.models import (
    Backend,
    GenerationResult,
    JobState,
    JobStatus,
    Timings,
    TokenEvent,
    Usage,
)
from jobcontract.settings import GenqSettings
from producer.async_client import AsyncClient
from producer.client import Client
from tests.callers import start_gateway

T = TypeVar("T")
REQUEST = {"model": "tiny", "prompt": "hi", "max_tokens": 8}


class Side(Protocol):
    def submit(self, request: dict[str, Any]) -> str: ...
    def status(self, job_id: str) -> JobStatus: ...
    def wait(self, job_id: str, timeout_s: float) -> GenerationResult: ...
    def tokens(self, job_id: str, timeout_s: float) -> list[TokenEvent]: ...
    def cancel(self, job_id: str) -> JobState: ...
    def stream(self, request: dict[str, Any], timeout_s: float) -> list[str]: ...


class SyncSide:
    def __init__(self, settings: GenqSettings) -> None:
        self.client = Client(settings)
        self.store = self.client.store

    def submit(self, request: dict[str, Any]) -> str:
        return self.client.submit(request)

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def wait(self, job_id: str, timeout_s: float) -> GenerationResult:
        return self.store.wait(job_id, timeout_s)

    def tokens(self, job_id: str, timeout_s: float) -> list[TokenEvent]:
        return list(self.store.tokens(job_id, timeout_s))

    def cancel(self, job_id: str) -> JobState:
        return self.store.cancel(job_id)

    def stream(self, request: dict[str, Any], timeout_s: float) -> list[str]:
        return list(self.client.stream(request, timeout_s))

    def close(self) -> None:
        self.client.close()


class AsyncSide:
    """Each call on its own event loop, with a store and a client made (and closed) inside it."""

    def __init__(self, settings: GenqSettings) -> None:
        self.settings = settings

    def _store(self, call: Callable[[AsyncJobStore], Any]) -> Any:
        async def run() -> Any:
            connection = connect_async(self.settings.redis_url)
            store = AsyncJobStore(
                connection,
                Keys(self.settings.namespace),
                result_ttl_s=self.settings.result_ttl_s,
                max_queued=self.settings.max_queued_jobs,
            )
            try:
                return await call(store)
            finally:
                await connection.aclose()

        return asyncio.run(run())

    def _client(self, call: Callable[[AsyncClient], Any]) -> Any:
        async def run() -> Any:
            async with AsyncClient(self.settings) as client:
                return await call(client)

        return asyncio.run(run())

    def submit(self, request: dict[str, Any]) -> str:
        return str(self._client(lambda c: c.submit(request)))

    def status(self, job_id: str) -> JobStatus:
        return self._store(lambda s: s.status(job_id))  # type: ignore[no-any-return]

    def wait(self, job_id: str, timeout_s: float) -> GenerationResult:
        return self._store(lambda s: s.wait(job_id, timeout_s))  # type: ignore[no-any-return]

    def tokens(self, job_id: str, timeout_s: float) -> list[TokenEvent]:
        async def collect(store: AsyncJobStore) -> list[TokenEvent]:
            return [t async for t in store.tokens(job_id, timeout_s)]

        return self._store(collect)  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> JobState:
        return self._store(lambda s: s.cancel(job_id))  # type: ignore[no-any-return]

    def stream(self, request: dict[str, Any], timeout_s: float) -> list[str]:
        async def collect(client: AsyncClient) -> list[str]:
            return [t async for t in client.stream(request, timeout_s)]

        return self._client(collect)  # type: ignore[no-any-return]

    def close(self) -> None:
        return None


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest, settings: GenqSettings) -> Iterator[Side]:
    made = SyncSide(settings) if request.param == "sync" else AsyncSide(settings)
    yield made
    made.close()


@pytest.fixture
def worker_store(redis_client: redis.Redis, keys: Keys, settings: GenqSettings) -> JobStore:
    """The worker's half of the protocol, as a worker makes these calls."""
    return JobStore(redis_client, keys, result_ttl_s=settings.result_ttl_s, max_queued=settings.max_queued_jobs)


def run_job(store: JobStore, job_id: str, attempts: list[list[str]]) -> GenerationResult:
    """Start the job and publish each attempt's tokens from index 0 (a retry starts over, as a
    retried or rerouted attempt does), then finish it with the last attempt's text."""
    status = store.status(job_id)
    for texts in attempts:
        store.start(job_id, "protocol-test", Backend.MLX, status.queue)
        for index, piece in enumerate(texts):
            store.publish_token(job_id, index, piece)
    result = results.succeeded(
        job_id,
        status.model,
        text="".join(attempts[-1]),
        finish_reason="length",
        usage=Usage(prompt_tokens=1, completion_tokens=len(attempts[-1])),
        backend=Backend.MLX,
        worker="protocol-test",
        attempts=[],
        timings=Timings(enqueued_at=status.enqueued_at, finished_at=store.now()),
        metadata={},
    )
    assert store.finish(result)
    return result


FIRST, RETRY = ["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"]
ONCE = ["a0", "a1", "a2", "b3"]  # each index once, the first text streamed for it


def run_when_submitted(store: JobStore, redis_client: redis.Redis, keys: Keys) -> threading.Thread:
    """Play the worker for the one job a caller is about to submit (callers that submit themselves)."""

    def play() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [k.decode() for k in redis_client.scan_iter(f"{keys.namespace}:job:*") if b":events" not in k]
            if found:
                run_job(store, found[0].rsplit(":", 1)[1], [FIRST, RETRY])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


def test_submit_status_wait(side: Side, worker_store: JobStore) -> None:
    job_id = side.submit(REQUEST)
    status = side.status(job_id)
    assert status.state is JobState.QUEUED and status.model == "tiny"
    expected = run_job(worker_store, job_id, [["x"]])
    assert side.wait(job_id, 10) == expected
    assert side.status(job_id).state is JobState.SUCCEEDED


def test_a_wait_that_times_out_raises_timeout(side: Side) -> None:
    job_id = side.submit(REQUEST)
    with pytest.raises(TimeoutError):
        side.wait(job_id, 0.3)


def test_tokens_after_an_empty_read_time_out_for_a_queued_job(side: Side) -> None:
    job_id = side.submit(REQUEST)
    with pytest.raises(TimeoutError):
        side.tokens(job_id, 0.3)


def test_tokens_of_a_retried_job_yield_each_index_once(side: Side, worker_store: JobStore) -> None:
    job_id = side.submit(REQUEST)
    run_job(worker_store, job_id, [FIRST, RETRY])
    tokens = side.tokens(job_id, 10)
    assert [t.index for t in tokens] == [0, 1, 2, 3]
    assert [t.text for t in tokens] == ONCE


def test_the_client_stream_of_a_retried_job_yields_each_index_once(
    side: Side, worker_store: JobStore, redis_client: redis.Redis, keys: Keys
) -> None:
    worker = run_when_submitted(worker_store, redis_client, keys)
    assert side.stream(REQUEST, 30) == ONCE
    worker.join(10)


def test_cancel_a_queued_job_finishes_it_with_its_real_enqueue_time(side: Side) -> None:
    job_id = side.submit(REQUEST)
    enqueued = side.status(job_id).enqueued_at
    assert side.cancel(job_id) is JobState.CANCELLED
    result = side.wait(job_id, 10)
    assert result.state is JobState.CANCELLED and result.timings.enqueued_at == enqueued
    assert side.cancel(job_id) is JobState.CANCELLED  # already ended: its state is the answer


def test_cancel_a_running_job_asks_its_worker(side: Side, worker_store: JobStore) -> None:
    job_id = side.submit(REQUEST)
    worker_store.start(job_id, "protocol-test", Backend.MLX, side.status(job_id).queue)
    assert side.cancel(job_id) is JobState.RUNNING
    status = side.status(job_id)
    assert status.state is JobState.RUNNING and status.cancel_requested


@pytest.mark.parametrize("call", ["status", "wait", "tokens", "cancel"])
def test_an_unknown_job_raises_unknown_job(side: Side, call: str) -> None:
    calls: dict[str, Callable[[str], object]] = {
        "status": side.status,
        "wait": lambda j: side.wait(j, 10),
        "tokens": lambda j: side.tokens(j, 10),
        "cancel": side.cancel,
    }
    with pytest.raises(UnknownJob):
        calls[call]("no-such-job")


def test_the_gateway_streams_each_index_of_a_retried_job_once(
    settings: GenqSettings, worker_store: JobStore, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    gateway = start_gateway(settings, tmp_path)
    try:
        worker = run_when_submitted(worker_store, redis_client, keys)
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
        chunks = sdk.completions.create(model="tiny", prompt="hi", max_tokens=8, stream=True)
        assert [c.choices[0].text for c in chunks if c.choices and c.choices[0].text] == ONCE
        worker.join(10)
    finally:
        gateway.stop()


@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_a_body_that_is_not_a_mapping_is_a_validation_error(settings: GenqSettings, make: type[Any]) -> None:
    made = make(settings)
    try:
        with pytest.raises(ValidationError):
            made.validate(["not", "an", "object"])
    finally:
        if isinstance(made, Client):
            made.close()
        else:
            asyncio.run(made.close())


@pytest.mark.parametrize("side_name", ["sync", "async"])
def test_a_batch_reports_its_start_on_both_clients(settings: GenqSettings, tmp_path: Path, side_name: str) -> None:
    """An empty input runs to its end at once, with no worker: enough to see `on_start` called."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("")
    started: list[str] = []

    def on_start(batch_id: str, _validation: Any) -> None:
        started.append(batch_id)

    if side_name == "sync":
        with Client(settings) as client:
            record = client.batch(source, output, on_start=on_start)
    else:

        async def run() -> Any:
            async with AsyncClient(settings) as client:
                return await client.batch(source, output, on_start=on_start)

        record = asyncio.run(run())
    assert started == [record.id]
