"""How the broker and the job store recover what a fault would otherwise lose, on real redis-servers:
jobs whose workers kept dying, read replies lost in a Redis restart, runs broken by an outage."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dramatiq
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.broker import StreamsBroker, StreamsConsumer
from jobcontract.connection import connect
from jobcontract.jobs import JobStore
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.models import Backend, JobState
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.queues import stream_of

QUEUE = "tiny.mlx.interactive"


@pytest.fixture
def broker(redis_client: redis.Redis, keys: Keys) -> StreamsBroker:
    broker = StreamsBroker(redis_client, keys, consumer_name="w1", middleware=[])
    broker.declare_queue(QUEUE)
    return broker


def test_a_job_whose_workers_keep_dying_is_dead_lettered_and_finished_as_failed(
    client: Client, broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "kills its worker", "max_tokens": 4})
    stream = stream_of(redis_client, keys, QUEUE, job_id)  # its partition (its prefix shard)
    for _ in range(broker.max_redeliveries + 1):
        assert redis_client.xreadgroup(CONSUMER_GROUP, "doomed", {stream: ">"}, count=1)
        client.store.start(job_id, "doomed", Backend.MLX, QUEUE)
        broker.reclaim_dead_consumers()  # "doomed" has no liveness key: it died
    began = time.monotonic()
    result = client.result(job_id, timeout=5)
    assert time.monotonic() - began < 2, "the waiter was not woken"
    assert result.state is JobState.FAILED
    assert result.error is not None and result.error.type == "worker_died" and result.error.retryable
    assert "handed back 5 times" in result.error.message
    assert result.worker == "doomed" and result.timings.started_at is not None
    assert result.timings.enqueued_at <= result.timings.finished_at
    [(_id, dead)] = redis_client.xrange(keys.dead_letters)
    assert dead[b"queue"] == QUEUE.encode()
    assert redis_client.xlen(stream) == 0
    assert client.status(job_id).state is JobState.FAILED


def test_a_finished_job_is_left_alone_when_its_entry_is_dead_lettered(
    client: Client, broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "finished, then its worker died", "max_tokens": 4})
    stream = stream_of(redis_client, keys, QUEUE, job_id)
    before = None
    for n in range(broker.max_redeliveries + 1):
        redis_client.xreadgroup(CONSUMER_GROUP, "doomed", {stream: ">"}, count=1)
        if n == 0:
            redis_client.hset(keys.job(job_id), "state", "succeeded")
            before = redis_client.hgetall(keys.job(job_id))
        broker.reclaim_dead_consumers()
    assert redis_client.xlen(keys.dead_letters) == 1
    assert redis_client.hgetall(keys.job(job_id)) == before
    assert redis_client.xlen(keys.events(job_id)) == 0


def test_entries_delivered_to_a_consumer_that_never_received_them_are_taken_back(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    for n in range(3):
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="a", args=(n,), kwargs={}, options={}))
    consumer = broker.consume(QUEUE, prefetch=10, timeout=100)
    assert isinstance(consumer, StreamsConsumer)
    first = next(consumer)
    assert first is not None and first.args == (0,)
    # Redis ran a read for this consumer whose reply never arrived (a restart, a re-sent command).
    redis_client.xreadgroup(CONSUMER_GROUP, "w1", {keys.stream(QUEUE): ">"}, count=10)
    consumer.next_orphan_check = 0.0
    adopted = [m for m in (next(consumer) for _ in range(5)) if m is not None]
    assert [m.args for m in adopted] == [(1,), (2,)]  # taken once each; the one it held is not taken again
    for message in [first, *adopted]:
        consumer.ack(message)
    assert redis_client.xpending(keys.stream(QUEUE), CONSUMER_GROUP)["pending"] == 0
    assert consumer.held == set() and consumer.in_flight == 0


def test_a_run_broken_off_by_a_redis_outage_is_handed_back_not_acked(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="a", args=(1,), kwargs={}, options={}))
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    message = next(consumer)
    assert message is not None
    message.stuff_exception(redis.ConnectionError("Connection refused"))
    consumer.ack(message)
    [(_id, fields)] = redis_client.xrange(keys.stream(QUEUE))
    assert fields[b"r"] == b"1"  # back in the queue as a new delivery
    assert redis_client.xpending(keys.stream(QUEUE), CONSUMER_GROUP)["pending"] == 0
    again = next(consumer)
    assert again is not None and again.args == (1,)


def test_a_worker_store_waits_out_a_redis_restart_and_a_caller_does_not() -> None:
    with LocalRedis(appendonly=True) as server:
        settings = GenqSettings(redis_url=server.url, namespace="outage")
        with Client(settings) as caller:
            job_id = caller.submit({"model": "tiny", "prompt": "x", "max_tokens": 2})
        worker = JobStore(connect(server.url), Keys("outage"), result_ttl_s=60, max_queued=10, outage_patience_s=20)
        caller_store = JobStore(connect(server.url), Keys("outage"), result_ttl_s=60, max_queued=10)
        server.stop()
        threading.Timer(1.5, server.start).start()
        with pytest.raises(redis.ConnectionError):
            caller_store.status(job_id)
        began = time.monotonic()
        ticket = worker.start(job_id, "w", Backend.MLX, QUEUE)
        waited = time.monotonic() - began
        assert ticket is not None and not isinstance(ticket, JobState)
        assert 0.5 < waited < 15
        assert caller_store.status(job_id).state is JobState.RUNNING


def test_a_batch_run_started_while_redis_is_down_waits_it_out(tmp_path: Path) -> None:
    """Its first Redis call (the check that each model fits some worker) rides out the outage as the
    rest of the run does: the sentinel failover test found a run started mid-failover exiting with 1."""

    class Started(Exception):
        """Raised once the run has created its batch: past every call of its start."""

    source = tmp_path / "input.jsonl"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    lines = [{"custom_id": f"c{n}", "method": "POST", "url": "/v1/completions", "body": body} for n in range(2)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def started(batch_id: str, _validation: object) -> None:
        raise Started(batch_id)

    with LocalRedis(appendonly=True) as server:
        settings = GenqSettings(redis_url=server.url, namespace="batchdown")
        with Client(settings) as client:
            server.stop()
            threading.Timer(1.5, server.start).start()
            with pytest.raises(Started):
                client.batch(source, tmp_path / "output.jsonl", on_start=started)
