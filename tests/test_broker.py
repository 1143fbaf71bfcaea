"""The streams broker under dramatiq's own Worker, on a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import dramatiq
import pytest
import redis

from jobcontract.broker import StreamsBroker
from jobcontract.keys import CONSUMER_GROUP, Keys
from tests.harness import wait_until

QUEUE = "unit.mlx.interactive"


@pytest.fixture
def broker(redis_client: redis.Redis, keys: Keys) -> Iterator[StreamsBroker]:
    broker = StreamsBroker(redis_client, keys, consumer_name="test-consumer", middleware=[])
    redis_client.set(keys.alive("test-consumer"), 1)
    yield broker


def _worker(broker: StreamsBroker, **kwargs: int) -> dramatiq.Worker:
    worker = dramatiq.Worker(
        broker, worker_threads=kwargs.get("threads", 2), worker_timeout=kwargs.get("timeout_ms", 1000)
    )
    worker.start()
    return worker


def test_an_idle_worker_is_woken_by_a_new_job_instead_of_polling(
    broker: StreamsBroker, redis_client: redis.Redis
) -> None:
    ran_at: list[float] = []
    dramatiq.actor(lambda: ran_at.append(time.monotonic()), actor_name="stamp", queue_name=QUEUE, broker=broker)
    # Reads of 2 s: a polling consumer would see the job only when its read ends, 1 s later on average.
    worker = _worker(broker, timeout_ms=2000)
    try:
        assert wait_until(lambda: any(c["cmd"] == "xreadgroup" for c in redis_client.client_list()), timeout=5)
        time.sleep(0.3)
        sent = time.monotonic()
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="stamp", args=(), kwargs={}, options={}))
        assert wait_until(lambda: bool(ran_at), timeout=4)
        assert ran_at[0] - sent < 1.0, "the job waited for the consumer's blocked read to time out"
    finally:
        worker.stop()


def test_processed_jobs_are_acked_and_deleted(broker: StreamsBroker, redis_client: redis.Redis, keys: Keys) -> None:
    seen: list[int] = []
    dramatiq.actor(lambda n: seen.append(n), actor_name="collect", queue_name=QUEUE, broker=broker)
    worker = _worker(broker, threads=4)
    try:
        for n in range(50):
            broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="collect", args=(n,), kwargs={}, options={}))
        broker.join(QUEUE, timeout=10_000)
    finally:
        worker.stop()
    assert sorted(seen) == list(range(50))
    assert redis_client.xlen(keys.stream(QUEUE)) == 0
    assert redis_client.xpending(keys.stream(QUEUE), CONSUMER_GROUP)["pending"] == 0


def _deliver_to_ghost(redis_client: redis.Redis, broker: StreamsBroker, keys: Keys, count: int) -> None:
    """A consumer that took jobs and died: entries in its pending list, nobody vouching for it."""
    broker.declare_queue(QUEUE)
    for n in range(count):
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="collect", args=(n,), kwargs={}, options={}))
    redis_client.xreadgroup(CONSUMER_GROUP, "ghost", {keys.stream(QUEUE): ">"}, count=count)


def test_jobs_of_a_dead_consumer_are_handed_back_and_run(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    _deliver_to_ghost(redis_client, broker, keys, 5)
    assert broker.reclaim_dead_consumers() == 5
    seen: list[int] = []
    dramatiq.actor(lambda n: seen.append(n), actor_name="collect", queue_name=QUEUE, broker=broker)
    worker = _worker(broker)
    try:
        assert wait_until(lambda: len(seen) == 5, timeout=10)
    finally:
        worker.stop()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    consumers = {c["name"] for c in redis_client.xinfo_consumers(keys.stream(QUEUE), CONSUMER_GROUP)}
    assert "ghost" not in {c.decode() if isinstance(c, bytes) else c for c in consumers}


def test_a_vouched_consumer_keeps_its_jobs(broker: StreamsBroker, redis_client: redis.Redis, keys: Keys) -> None:
    _deliver_to_ghost(redis_client, broker, keys, 3)
    redis_client.set(keys.alive("ghost"), 1, px=10_000)
    assert broker.reclaim_dead_consumers() == 0
    assert redis_client.xpending(keys.stream(QUEUE), CONSUMER_GROUP)["pending"] == 3


def test_racing_janitors_hand_each_job_back_once(broker: StreamsBroker, redis_client: redis.Redis, keys: Keys) -> None:
    _deliver_to_ghost(redis_client, broker, keys, 20)
    others = [StreamsBroker(redis_client, keys, consumer_name=f"j{i}", middleware=[]) for i in range(4)]
    moved: list[int] = []
    threads = [threading.Thread(target=lambda b=b: moved.append(b.reclaim_dead_consumers())) for b in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(moved) == 20
    assert redis_client.xlen(keys.stream(QUEUE)) == 20


def test_a_job_that_keeps_killing_its_worker_ends_in_dead_letters(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    _deliver_to_ghost(redis_client, broker, keys, 1)
    for _ in range(broker.max_redeliveries + 1):
        broker.reclaim_dead_consumers()
        redis_client.xreadgroup(CONSUMER_GROUP, "ghost", {keys.stream(QUEUE): ">"}, count=1)
    broker.reclaim_dead_consumers()
    assert redis_client.xlen(keys.stream(QUEUE)) == 0
    dead = redis_client.xrange(keys.dead_letters)
    assert len(dead) == 1
    assert b"handed back" in dead[0][1][b"reason"]


def test_an_undecodable_entry_goes_to_dead_letters_without_blocking_the_queue(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    seen: list[int] = []
    dramatiq.actor(lambda n: seen.append(n), actor_name="collect", queue_name=QUEUE, broker=broker)
    redis_client.xadd(keys.stream(QUEUE), {"m": b"{not json", "r": 0})
    broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="collect", args=(7,), kwargs={}, options={}))
    worker = _worker(broker)
    try:
        assert wait_until(lambda: seen == [7], timeout=10)
    finally:
        worker.stop()
    assert redis_client.xlen(keys.dead_letters) == 1


def test_prefetched_jobs_are_handed_back_on_shutdown(
    broker: StreamsBroker, redis_client: redis.Redis, keys: Keys
) -> None:
    release = threading.Event()
    started: list[int] = []

    def slow(n: int) -> None:
        started.append(n)
        release.wait(10)

    dramatiq.actor(slow, actor_name="slow", queue_name=QUEUE, broker=broker)
    for n in range(6):
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="slow", args=(n,), kwargs={}, options={}))
    worker = _worker(broker, threads=1)
    assert wait_until(lambda: len(started) == 1, timeout=10)
    threading.Timer(0.5, release.set).start()
    worker.stop(timeout=5000)
    # One ran; the rest are back in the stream, undelivered, for the next worker.
    assert redis_client.xpending(keys.stream(QUEUE), CONSUMER_GROUP)["pending"] == 0
    assert redis_client.xlen(keys.stream(QUEUE)) == 5
