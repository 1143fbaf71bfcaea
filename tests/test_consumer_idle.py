"""An idle consumer waits long in one read (jobcontract.consumer.IDLE_BLOCK_MS, jobcontract.idle_read),
so an idle worker costs Redis a few calls a second (issue #12): on a real redis-server, what must still
wake it does, at once: a job on what it reads, a new tenant's first job (its queue's bell), a worker
that stops; and a consumer that must look again by itself (partitions held back by an age bound) does
not wait long."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis

from jobcontract import consumer as consumer_module
from jobcontract import protocol
from jobcontract.admission import Admission
from jobcontract.broker import StreamsBroker
from jobcontract.keys import CONSUMER_GROUP, Keys, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, Lane
from jobcontract.protocol.jobs import Submit
from jobcontract.protocol.liveness import Vouch
from jobcontract.routes import BackendRoute, ModelRoute

ROUTE = ModelRoute(name="tiny", backends=[BackendRoute(path="tiny-mlx")])
QUEUE = queue_name("tiny", Backend.MLX, Lane.BATCH)
POOL = pool_name("tiny", Backend.MLX)
# Far longer than any wait here: a read that was not woken would hold the test this long.
LONG_BLOCK_MS = 120_000


@pytest.fixture(autouse=True)
def long_idle_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "IDLE_BLOCK_MS", LONG_BLOCK_MS)


@pytest.fixture
def broker(redis_client: redis.Redis, keys: Keys) -> Iterator[StreamsBroker]:
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    yield broker
    broker.quiet()


def submit(client: redis.Redis, keys: Keys, prompt: str, *, tenant: str | None = None) -> None:
    request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=4, lane=Lane.BATCH)
    ids = [f"{prompt}-{tenant}"]
    protocol.run(client, Submit(Admission(keys, 10_000, 60, 30.0), [request], ids, lambda _: ROUTE, tenant=tenant))


def next_in_thread(consumer: Any) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(next(consumer)), daemon=True)
    thread.start()
    return thread, got


def wait_reading_idle(consumer: Any) -> None:
    assert wait_for(consumer.reading_idle), "the consumer never began its idle read"


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        event.wait(0.01)
    return False


def prompt_of(message: Any) -> str:
    assert isinstance(message, dramatiq.MessageProxy)
    return str(message.kwargs["request"]["prompt"])


def test_an_idle_consumer_wakes_for_a_job_on_its_queue(
    redis_client: redis.Redis, keys: Keys, broker: StreamsBroker
) -> None:
    consumer = broker.consume(QUEUE, prefetch=4)
    thread, got = next_in_thread(consumer)
    wait_reading_idle(consumer)
    submit(redis_client, keys, "plain")
    thread.join(timeout=30)
    assert not thread.is_alive() and got and prompt_of(got[0]) == "plain"


def test_a_new_tenants_first_job_rings_the_bell_and_the_idle_consumer_takes_it(
    redis_client: redis.Redis, keys: Keys, broker: StreamsBroker
) -> None:
    """The tenant's partition did not exist when the consumer began to wait, so the job is not on
    anything it reads: the bell (rung when the partition is made) wakes it, and its take finds the job
    in the same call (a 2 s wait for the new tenant before, 10 s with idle reads and no bell)."""
    consumer = broker.consume(QUEUE, prefetch=4)
    thread, got = next_in_thread(consumer)
    wait_reading_idle(consumer)
    submit(redis_client, keys, "first of a new tenant", tenant="newcomer")
    thread.join(timeout=30)
    assert not thread.is_alive() and got and prompt_of(got[0]) == "first of a new tenant"
    # The ring is acked: the bell holds nothing pending on the consumer.
    assert redis_client.xpending(keys.bell(QUEUE), CONSUMER_GROUP)["pending"] == 0


def test_a_stopping_worker_ends_the_idle_reads_at_once(
    redis_client: redis.Redis, keys: Keys, broker: StreamsBroker
) -> None:
    """dramatiq's Worker.stop emits worker_shutdown first; the broker then ends every idle read
    (CLIENT UNBLOCK) and starts no other, so the consumer threads stop without waiting theirs out."""
    consumers = [broker.consume(QUEUE, prefetch=4), broker.consume(f"{QUEUE}.DQ", prefetch=4)]
    threads = [next_in_thread(c) for c in consumers]
    for consumer in consumers:
        wait_reading_idle(consumer)
    broker.emit_before("worker_shutdown", None)
    for thread, got in threads:
        thread.join(timeout=30)
        assert not thread.is_alive() and got == [None]
    assert broker.quieting.is_set()
    assert next(consumers[0]) is None  # no idle read any more: a brief one, as before idle reads
    assert not consumers[0].reading_idle()


def test_a_consumer_with_partitions_held_back_by_an_age_bound_does_not_wait_long(
    redis_client: redis.Redis, keys: Keys, broker: StreamsBroker
) -> None:
    """A prefix shard another live worker owns is read only once its jobs waited the steal bound: a
    blocking read does not see what lands there (its owner may be busy), so the consumer must look
    again within its plain block, even with nothing waiting anywhere now."""
    protocol.run(redis_client, Vouch(keys, POOL, workers=["w1", "w2"], ready=[True, True], ttl_ms=60_000))
    submit(redis_client, keys, "Instruction: classify the text below by the rubric. " * 25)  # makes every shard
    for member in redis_client.smembers(keys.partitions(QUEUE)):
        redis_client.xtrim(keys.partition(QUEUE, member.decode()), maxlen=0)  # nothing waits
    consumer = broker.consume(QUEUE, prefetch=4)
    thread, got = next_in_thread(consumer)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the read waited long though partitions were held back"
    assert got == [None] and not consumer.idle_streams


def test_the_janitor_drops_a_dead_consumer_from_the_bell(
    redis_client: redis.Redis, keys: Keys, broker: StreamsBroker
) -> None:
    redis_client.xadd(keys.bell(QUEUE), {"p": "x"})
    redis_client.xreadgroup(CONSUMER_GROUP, "gone", {keys.bell(QUEUE): ">"})
    names = [c["name"] for c in redis_client.xinfo_consumers(keys.bell(QUEUE), CONSUMER_GROUP)]
    assert b"gone" in names or "gone" in names
    broker.reclaim_dead_consumers()
    assert redis_client.xinfo_consumers(keys.bell(QUEUE), CONSUMER_GROUP) == []
