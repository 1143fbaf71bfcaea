"""Streamed tokens grouped into fewer XADDs (workers.token_batch) still reach every reader once each,
in order: the first at once, the others within the window even when nothing follows them."""

from __future__ import annotations

import threading

import pytest
import redis

from jobcontract import results
from jobcontract.jobs import JobStore
from jobcontract.keys import Keys
from jobcontract.models import Backend, Timings, Usage
from jobcontract.settings import GenqSettings
from producer.client import Client
from workers.token_batch import TokenBatch


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, list[str]]] = []
        self.event = threading.Event()

    def __call__(self, first: int, texts: list[str]) -> None:
        self.sent.append((first, list(texts)))
        self.event.set()


def test_the_first_token_goes_at_once_and_the_rest_of_a_burst_together() -> None:
    sent = Recorder()
    with TokenBatch(sent, window_s=3600) as batch:  # a window no test outlives: only close sends
        for index, piece in enumerate(["a", "b", "c", "d"]):
            batch.add(index, piece)
        assert sent.sent == [(0, ["a"])]
    assert sent.sent == [(0, ["a"]), (1, ["b", "c", "d"])]


def test_without_a_window_every_token_goes_alone() -> None:
    sent = Recorder()
    with TokenBatch(sent, window_s=0) as batch:
        for index, piece in enumerate(["a", "b", "c"]):
            batch.add(index, piece)
    assert sent.sent == [(0, ["a"]), (1, ["b"]), (2, ["c"])]


def test_a_waiting_token_is_sent_when_its_window_ends_though_none_follows() -> None:
    sent = Recorder()
    batch = TokenBatch(sent, window_s=0.05)
    batch.add(0, "a")
    sent.event.clear()
    batch.add(1, "b")  # inside the window: waits for the flusher
    assert sent.event.wait(30), "the flusher never sent the waiting token"
    assert sent.sent == [(0, ["a"]), (1, ["b"])]
    batch.close()
    assert len(sent.sent) == 2


def test_a_publish_that_fails_keeps_its_tokens_for_the_next_send() -> None:
    sent = Recorder()
    failing = [True]

    def publish(first: int, texts: list[str]) -> None:
        if failing[0]:
            failing[0] = False
            raise redis.ConnectionError("down")
        sent(first, texts)

    batch = TokenBatch(publish, window_s=3600)
    with pytest.raises(redis.ConnectionError):
        batch.add(0, "a")  # fails the attempt, as one XADD per token did
    batch.add(1, "b")
    batch.close()
    assert sent.sent == [(0, ["a", "b"])]


def test_grouped_and_single_events_read_back_once_each_across_a_retried_attempt(
    settings: GenqSettings, redis_client: redis.Redis, keys: Keys
) -> None:
    store = JobStore(redis_client, keys, result_ttl_s=settings.result_ttl_s, max_queued=settings.max_queued_jobs)
    with Client(settings) as client:
        job_id = client.submit({"model": "tiny", "prompt": "p", "max_tokens": 8, "stream": True})
        status = store.status(job_id)
        store.start(job_id, "token-test", Backend.MLX, status.queue)
        store.publish_tokens(job_id, 0, ["a0"])
        store.publish_tokens(job_id, 1, ["a1", "a2"])
        # A retried attempt starts over from index 0, grouped differently; only index 3 is new.
        store.start(job_id, "token-test", Backend.MLX, status.queue)
        store.publish_tokens(job_id, 0, ["b0", "b1", "b2", "b3"])
        done = results.succeeded(
            job_id,
            status.model,
            text="b0b1b2b3",
            finish_reason="length",
            usage=Usage(prompt_tokens=1, completion_tokens=4),
            backend=Backend.MLX,
            worker="token-test",
            attempts=[],
            timings=Timings(enqueued_at=status.enqueued_at, finished_at=store.now()),
            metadata={},
        )
        assert store.finish(done)
    read = list(store.tokens(job_id, 30))
    assert [(t.index, t.text) for t in read] == [(0, "a0"), (1, "a1"), (2, "a2"), (3, "b3")]
