"""Admission defects of issue #10 ("nothing silently lost or run twice"), on a real redis-server.

Each test failed on the code before its fix: a reused idempotency key answered with another
request's job, a used job id queued again, a list admitted in part, a batch counting a line twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.admission import Receipt
from jobcontract.jobs import SUBMIT_SCRIPT, IdempotencyConflict, StartTicket
from jobcontract.keys import Keys, queue_name
from jobcontract.models import Backend, GenerationResult, JobState, Lane, Timings
from jobcontract.settings import GenqSettings
from producer.async_client import AsyncClient
from producer.client import Client, QueueFull
from tests.queues import queued as queued_in

QUEUE = queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)


def ask(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4, **extra}


# -- an idempotency key reused with another request -------------------------------------------------
def test_a_reused_idempotency_key_with_another_request_is_refused(
    client: Client, keys: Keys, redis_client: redis.Redis
) -> None:
    first = client.submit(ask("charge card 42", idempotency_key="order-42"))
    # The same request, spelled with a default written out, is the same request: the same job.
    assert client.submit(ask("charge card 42", idempotency_key="order-42", temperature=1.0)) == first
    with pytest.raises(IdempotencyConflict) as refused:
        client.submit(ask("charge card 43", idempotency_key="order-42"))
    assert (refused.value.key, refused.value.job_id) == ("order-42", first)
    assert client.status(first).state.value == "queued"
    assert queued_in(redis_client, keys, QUEUE) == 1
    with pytest.raises(IdempotencyConflict):
        client.submit_many([ask("charge card 42", idempotency_key="order-42", max_tokens=5)])


def test_a_reused_idempotency_key_with_another_request_is_refused_async(
    settings: GenqSettings, keys: Keys, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with AsyncClient(settings) as client:
            first = await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42"))
            assert await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42")) == first
            with pytest.raises(IdempotencyConflict) as refused:
                await client.submit(ask("charge card 42", idempotency_key="tenant-a:order-42", seed=7))
            assert (refused.value.key, refused.value.job_id) == ("tenant-a:order-42", first)
            with pytest.raises(IdempotencyConflict):
                await client.submit_many([ask("refund", idempotency_key="tenant-a:order-42")])

    asyncio.run(scenario())
    assert queued_in(redis_client, keys, QUEUE) == 1


# -- a job id that already exists is never queued again ----------------------------------------------
def finish(client: Client, job_id: str, text: str) -> None:
    status = client.status(job_id)
    assert isinstance(client.store.start(job_id, "w1", Backend.MLX, status.queue), StartTicket)
    result = GenerationResult(
        job_id=job_id,
        model=status.model,
        state=JobState.SUCCEEDED,
        text=text,
        timings=Timings(enqueued_at=status.enqueued_at, finished_at=client.store.now()),
    )
    assert client.store.finish(result)


def test_a_used_job_id_is_answered_with_its_job_never_queued_again(
    client: Client, keys: Keys, redis_client: redis.Redis
) -> None:
    queued = client.submit(ask("still queued"), job_id="job-queued")
    before = client.status(queued)
    assert client.submit(ask("still queued"), job_id="job-queued") == queued
    assert client.submit_many([ask("still queued")], job_ids=["job-queued"]) == [queued]
    assert client.status(queued) == before

    done = client.submit(ask("finished"), job_id="job-done")
    finish(client, done, "the first answer")
    assert client.result(done, timeout=1).text == "the first answer"  # the caller read this text
    assert client.submit(ask("finished"), job_id="job-done") == done
    status = client.status(done)
    assert (status.state, status.starts) == (JobState.SUCCEEDED, 1)
    assert client.result(done, timeout=1).text == "the first answer"
    with pytest.raises(IdempotencyConflict) as refused:  # the same id for another request
        client.submit(ask("another ask"), job_id="job-done")
    assert (refused.value.key, refused.value.job_id) == ("job-done", "job-done")
    assert queued_in(redis_client, keys, QUEUE) == 2  # one message per job, ever


class DroppingProxy:
    """A TCP proxy in front of Redis that, once armed, forwards the next admission script (EVALSHA)
    and then drops the connection instead of passing on Redis's reply: the reply lost after the
    command ran, as a socket timeout loses it. redis-py then sends the command again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.dropped = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [downstream, upstream]
            drop = threading.Event()
            threading.Thread(target=self._requests, args=(downstream, upstream, drop), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, downstream, drop), daemon=True).start()

    def _requests(self, downstream: socket.socket, upstream: socket.socket, drop: threading.Event) -> None:
        while data := _recv(downstream):
            if self.armed.is_set() and b"EVALSHA" in data.upper():
                self.armed.clear()
                drop.set()
            upstream.sendall(data)
        _close(downstream, upstream)

    def _replies(self, upstream: socket.socket, downstream: socket.socket, drop: threading.Event) -> None:
        while data := _recv(upstream):
            if drop.is_set():  # Redis answered; the caller never hears it
                self.dropped += 1
                break
            downstream.sendall(data)
        _close(downstream, upstream)

    def close(self) -> None:
        self.listener.close()
        _close(*self.sockets)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def lossy_client(settings: GenqSettings, redis_server: LocalRedis, redis_client: redis.Redis) -> Iterator[LossyClient]:
    proxy = DroppingProxy("127.0.0.1", redis_server.port)
    try:
        with Client(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}/0"})) as client:
            redis_client.script_load(SUBMIT_SCRIPT)  # so the dropped reply is the script's, not NOSCRIPT's
            yield LossyClient(client, proxy)
    finally:
        proxy.close()


@dataclass
class LossyClient:
    client: Client
    proxy: DroppingProxy


def test_an_admission_sent_again_after_its_reply_was_lost_queues_once(
    lossy_client: LossyClient, keys: Keys, redis_client: redis.Redis
) -> None:
    client, proxy = lossy_client.client, lossy_client.proxy
    proxy.armed.set()
    job_id = client.submit(ask("once"))
    assert proxy.dropped == 1  # the first reply was lost and redis-py sent the script again
    assert client.status(job_id).starts == 0
    assert queued_in(redis_client, keys, QUEUE) == 1

    finish(client, job_id, "read once")
    proxy.armed.set()
    ids = client.submit_many([ask("a"), ask("b"), ask("c")])
    assert proxy.dropped == 2
    assert len(set(ids)) == 3
    assert queued_in(redis_client, keys, QUEUE) == 4
    assert client.result(job_id, timeout=1).text == "read once"

    # The gateway keeps a quota slot per job it creates and gives it back for a duplicate: a resent
    # script must not make the caller's own new job look like an earlier one.
    route, request = client.settings.routes.get("tiny"), client.validate(ask("mine", idempotency_key="k"))
    proxy.armed.set()
    mine = client.store.submit(request, route, default_timeout_s=60, job_id="mine")
    assert proxy.dropped == 3
    assert mine == Receipt(job_id="mine", queue=QUEUE, duplicate=False)
    again = client.store.submit(request, route, default_timeout_s=60, job_id="another id")
    assert again == Receipt(job_id="mine", queue=QUEUE, duplicate=True)


# -- a list is admitted whole or not at all -----------------------------------------------------------
BATCH_QUEUE = queue_name("tiny", Backend.MLX, Lane.BATCH)


def footprint(redis_client: redis.Redis, keys: Keys) -> tuple[int, int, int]:
    """Job records, and messages in the interactive and the batch queue."""
    jobs = sum(1 for k in redis_client.scan_iter(f"{keys.namespace}:job:*") if not k.endswith(b":events"))
    return jobs, queued_in(redis_client, keys, QUEUE), queued_in(redis_client, keys, BATCH_QUEUE)


def test_a_list_that_crosses_a_queue_bound_is_refused_whole(
    settings: GenqSettings, keys: Keys, redis_client: redis.Redis
) -> None:
    with Client(settings.model_copy(update={"max_queued_jobs": 3})) as client:
        client.submit(ask("already queued"))
        five = [ask(f"line {i}", idempotency_key=f"line-{i}") for i in range(5)]
        with pytest.raises(QueueFull):
            client.submit_many(five)
        assert footprint(redis_client, keys) == (1, 1, 0)  # nothing of the list got in
        # Every target queue is checked before any job is written: room in one is not enough.
        client.submit_many([ask(f"batch {i}", lane="batch") for i in range(3)])
        with pytest.raises(QueueFull):
            client.submit_many([ask("fits"), ask("does not fit", lane="batch")])
        assert footprint(redis_client, keys) == (4, 1, 3)
        with pytest.raises(IdempotencyConflict):  # a refusal for one request refuses the list
            client.submit_many([ask("fits"), ask("one", idempotency_key="k"), ask("two", idempotency_key="k")])
        assert footprint(redis_client, keys) == (4, 1, 3)
        client.submit_many([ask("line 0", idempotency_key="line-0")])
        with pytest.raises(IdempotencyConflict):
            client.submit_many([ask("fits"), ask("line 0, changed", idempotency_key="line-0")])
        assert footprint(redis_client, keys) == (5, 2, 3)
        # The same list retried once there is room: each request once, nothing twice.
        ids = client.submit_many(five[:2])
        assert client.submit_many(five[:2]) == ids
        assert footprint(redis_client, keys) == (6, 3, 3)


def test_a_list_that_crosses_a_queue_bound_is_refused_whole_async(
    settings: GenqSettings, keys: Keys, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with AsyncClient(settings.model_copy(update={"max_queued_jobs": 3})) as client:
            await client.submit(ask("already queued"))
            with pytest.raises(QueueFull):
                await client.submit_many([ask(f"line {i}") for i in range(5)])
            assert footprint(redis_client, keys) == (1, 1, 0)
            with pytest.raises(IdempotencyConflict):
                twice = [ask("fits"), ask("one", idempotency_key="k"), ask("two", idempotency_key="k")]
                await client.submit_many(twice)
            assert footprint(redis_client, keys) == (1, 1, 0)
            ids = await client.submit_many([ask("line 0"), ask("line 1")])
            assert len(set(ids)) == 2
            assert footprint(redis_client, keys) == (3, 3, 0)

    asyncio.run(scenario())
