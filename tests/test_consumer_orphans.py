"""The consumer's orphan check on a real redis-server: it takes entries pending on its name that it
never received, and never one it received and settled while the check was reading."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis

from jobcontract.broker import StreamsBroker
from jobcontract.consumer import StreamMessage, StreamsConsumer
from jobcontract.keys import CONSUMER_GROUP, Keys

QUEUE = "orphans.mlx.interactive"


class AckDuringRead:
    """The real client; the orphan check's read is answered, then the job's ack lands (as a worker
    thread finishing the job would) before the consumer looks at the reply."""

    def __init__(self, client: redis.Redis, on_read: Any) -> None:
        self._client = client
        self._on_read = on_read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        reply = self._client.xreadgroup(*args, **kwargs)
        if "0" in args[2].values():
            self._on_read()
        return reply


def received(consumer: StreamsConsumer) -> StreamMessage:
    for _ in range(50):
        message = next(consumer)
        if message is not None:
            assert isinstance(message, StreamMessage)
            return message
    raise AssertionError("nothing delivered")


def test_an_entry_settled_while_the_orphan_check_reads_is_not_taken_again(
    redis_client: redis.Redis, keys: Keys
) -> None:
    broker = StreamsBroker(redis_client, keys, consumer_name="c1", middleware=[])
    broker.declare_queue(QUEUE)
    broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="a", args=(), kwargs={}, options={}))
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    assert isinstance(consumer, StreamsConsumer)
    message = received(consumer)
    consumer.client = AckDuringRead(redis_client, lambda: consumer.ack(message))  # type: ignore[assignment]
    consumer._adopt_orphans()
    assert not consumer.buffer, "a job acked and finished was taken again"
    assert consumer.in_flight == 0


def test_an_entry_delivered_here_but_never_received_is_still_taken(redis_client: redis.Redis, keys: Keys) -> None:
    broker = StreamsBroker(redis_client, keys, consumer_name="c2", middleware=[])
    broker.declare_queue(QUEUE)
    broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="a", args=(), kwargs={}, options={}))
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    assert isinstance(consumer, StreamsConsumer)
    # A read whose reply was lost: the entry is pending on this name, the consumer never saw it.
    redis_client.xreadgroup(CONSUMER_GROUP, "c2", {consumer.stream: ">"}, count=10)
    consumer._adopt_orphans()
    assert len(consumer.buffer) == 1
