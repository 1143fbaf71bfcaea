"""Dead letters on a real redis-server: filed by the broker's real paths, listed, shown, replayed
into a run a caller can wait on, purged; and the `genq dlq` command over the same store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import dramatiq
import pytest
import redis

from jobcontract.broker import StreamsBroker, StreamsConsumer
from jobcontract.deadletters import DeadLetters, ReplayRefused
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.models import Backend, GenerationResult, JobError, JobState, Timings
from jobcontract.protocol.entry import DeadLetterCap
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.queues import partition_streams, stream_of

QUEUE = "tiny.mlx.interactive"


@pytest.fixture
def broker(redis_client: redis.Redis, keys: Keys) -> StreamsBroker:
    broker = StreamsBroker(redis_client, keys, consumer_name="w1", middleware=[])
    broker.declare_queue(QUEUE)
    redis_client.set(keys.alive("w1"), 1)
    return broker


@pytest.fixture
def letters(redis_client: redis.Redis, keys: Keys, settings: GenqSettings) -> DeadLetters:
    return DeadLetters(
        redis_client, keys, default_timeout_s=settings.default_timeout_s, result_ttl_s=settings.result_ttl_s
    )


def _consumer(broker: StreamsBroker) -> StreamsConsumer:
    consumer = broker.consume(QUEUE, prefetch=10, timeout=100)
    assert isinstance(consumer, StreamsConsumer)
    return consumer


def give_up(client: Client, consumer: StreamsConsumer, reason: str) -> str:
    """What the rerouting middleware does when every try failed: a FAILED result, then a nack."""
    message = next(m for m in iter(consumer) if m is not None)
    job_id = message.message_id
    client.store.start(job_id, "w1", Backend.MLX, QUEUE)
    status = client.status(job_id)
    client.store.finish(
        GenerationResult(
            job_id=job_id,
            model="tiny",
            state=JobState.FAILED,
            finish_reason="error",
            timings=Timings(enqueued_at=status.enqueued_at, finished_at=client.store.now()),
            error=JobError(type="connection_error", message=reason, retryable=True),
        )
    )
    message.fail()
    message.stuff_exception(RuntimeError(reason))
    consumer.nack(message)
    return job_id


def test_dead_letters_from_every_path_are_listed_with_their_reasons_and_purged(
    client: Client, broker: StreamsBroker, letters: DeadLetters, redis_client: redis.Redis, keys: Keys
) -> None:
    gave_up = client.submit({"model": "tiny", "prompt": "every backend failed"})
    given_up = give_up(client, _consumer(broker), "every backend failed (mlx); last: server died")
    assert given_up == gave_up
    killer = client.submit({"model": "tiny", "prompt": "kills its workers"})
    partition = stream_of(redis_client, keys, QUEUE, killer)
    for _ in range(broker.max_redeliveries + 1):
        redis_client.xreadgroup(CONSUMER_GROUP, "doomed", {partition: ">"}, count=1)
        broker.reclaim_dead_consumers()
    redis_client.xadd(keys.stream(QUEUE), {"m": b"{garbage", "r": 0})
    assert next(m for m in (next(_consumer(broker)) for _ in range(3)) if m is None) is None  # filed, not run

    listed = letters.entries()
    assert [letter.job_id for letter in listed] == [gave_up, killer, None]
    assert "every backend failed" in listed[0].reason
    assert "handed back 5 times" in listed[1].reason
    assert "undecodable" in listed[2].reason
    assert {letter.queue for letter in listed} == {QUEUE}
    assert letters.get(killer) == listed[1] == letters.get(listed[1].entry_id)
    assert letters.entries(limit=2) == listed[:2]
    shown = letters.get(gave_up).details()
    assert shown["message"]["args"] == [gave_up]
    assert "raw" in listed[2].details()
    status = letters.status(listed[0])
    assert status is not None and status.state is JobState.FAILED

    assert letters.purge([killer]) == 1
    assert [letter.job_id for letter in letters.entries()] == [gave_up, None]
    with pytest.raises(KeyError):
        letters.get(killer)
    assert letters.purge() == 2
    assert letters.count() == 0


def test_a_replayed_job_runs_again_and_its_caller_gets_the_new_result(
    client: Client, broker: StreamsBroker, letters: DeadLetters, redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "replay me", "max_tokens": 4, "idempotency_key": "k-1"})
    give_up(client, _consumer(broker), "every backend failed")
    assert client.result(job_id, timeout=1).state is JobState.FAILED

    replayed = letters.replay(job_id)
    assert (replayed.job_id, replayed.queue, replayed.previous_state) == (job_id, QUEUE, "failed")
    assert letters.count() == 0
    status = client.status(job_id)
    assert (status.state, status.starts, status.worker) == (JobState.QUEUED, 0, None)
    assert client.store.result(job_id) is None
    assert redis_client.hget(keys.job(job_id), "replays") == b"1"
    assert client.submit({"model": "tiny", "prompt": "replay me", "max_tokens": 4, "idempotency_key": "k-1"}) == job_id

    waited: list[GenerationResult] = []
    waiter = threading.Thread(target=lambda: waited.append(client.result(job_id, timeout=20)))
    waiter.start()  # a caller waiting on the same id sees the new run, not the old failure
    consumer = _consumer(broker)
    message = next(m for m in iter(consumer) if m is not None)
    assert message.message_id == job_id
    assert message.kwargs["attempts"] == [] and message.redeliveries == 0
    ticket = client.store.start(job_id, "w1", Backend.MLX, QUEUE)
    assert ticket is not None and not isinstance(ticket, JobState)
    client.store.finish(
        GenerationResult(
            job_id=job_id,
            model="tiny",
            state=JobState.SUCCEEDED,
            text="second time lucky",
            timings=Timings(enqueued_at=client.status(job_id).enqueued_at, finished_at=client.store.now()),
        )
    )
    consumer.ack(message)
    waiter.join(timeout=30)
    assert [r.text for r in waited] == ["second time lucky"]
    assert sum(1 for _i, f in redis_client.xrange(keys.events(job_id)) if f[b"type"] == b"done") == 1


def test_a_job_that_succeeded_or_was_cancelled_meanwhile_is_not_replayed(
    client: Client, broker: StreamsBroker, letters: DeadLetters, redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    give_up(client, _consumer(broker), "gave up")
    redis_client.hset(keys.job(job_id), "state", "succeeded")
    with pytest.raises(ReplayRefused, match="succeeded"):
        letters.replay(job_id)
    assert letters.count() == 1
    redis_client.xadd(keys.dead_letters, {"m": b"not a message", "queue": QUEUE, "reason": "undecodable"})
    replayed, refused = letters.replay_all()
    assert replayed == [] and len(refused) == 2


def test_a_job_that_died_in_a_delay_queue_is_replayed_to_its_own_queue_at_once(
    client: Client, letters: DeadLetters, redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = client.submit({"model": "tiny", "prompt": "x"})
    [stream] = [s for s in partition_streams(redis_client, keys, QUEUE) if redis_client.xlen(s)]
    [(entry_id, fields)] = redis_client.xrange(stream)
    delayed = dramatiq.Message.decode(fields[b"m"]).copy(queue_name=QUEUE + ".DQ", options={"eta": 1})
    redis_client.xadd(keys.dead_letters, {"m": delayed.encode(), "queue": QUEUE + ".DQ", "reason": "r"})
    redis_client.xdel(stream, entry_id)
    assert letters.replay(job_id).queue == QUEUE
    [(_id, fields)] = redis_client.xrange(stream)  # back in its own partition (its prefix shard)
    again = dramatiq.Message.decode(fields[b"m"])
    assert again.queue_name == QUEUE and "eta" not in again.options


def genq(settings: GenqSettings, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GENQ_REDIS_URL": settings.redis_url, "GENQ_NAMESPACE": settings.namespace}
    return subprocess.run(
        [sys.executable, "-m", "genq", "dlq", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_genq_dlq_command(client: Client, broker: StreamsBroker, settings: GenqSettings) -> None:
    first = client.submit({"model": "tiny", "prompt": "one"})
    second = client.submit({"model": "tiny", "prompt": "two"})
    consumer = _consumer(broker)
    give_up(client, consumer, "reason one")
    give_up(client, consumer, "reason two")

    listed = genq(settings, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["job_id"] for r in rows] == [first, second]
    assert "reason one" in rows[0]["reason"]
    human = genq(settings, "list")
    assert "2 dead letter(s)" in human.stdout and first in human.stdout

    shown = genq(settings, "show", second)
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["job_id"] == second and body["job"]["state"] == "failed"

    replayed = genq(settings, "replay", rows[0]["id"])
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"job_id": first, "queue": QUEUE, "was": "failed"}
    assert client.status(first).state is JobState.QUEUED

    assert genq(settings, "replay").returncode != 0  # neither ids nor --all
    missing = genq(settings, "show", "no-such-job")
    assert missing.returncode == 1 and "no dead letter" in missing.stderr

    purged = genq(settings, "purge", "--all")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert genq(settings, "list", "--json").stdout == ""


# -- the cap --------------------------------------------------------------------------------------------
def test_dead_letters_are_capped_by_count_on_every_path_that_files_one(redis_client: redis.Redis, keys: Keys) -> None:
    """A poison flood cannot fill Redis: the janitor's path (Requeue) and the consumer's (Reject) both
    trim the stream to its cap (`~`: Redis trims whole nodes of 100 entries)."""
    cap = DeadLetterCap(max_len=10, max_age_s=0)
    broker = StreamsBroker(redis_client, keys, consumer_name="w1", middleware=[], dead_letter_cap=cap)
    broker.declare_queue(QUEUE)
    redis_client.set(keys.alive("w1"), 1)
    for n in range(250):
        redis_client.xadd(keys.stream(QUEUE), {"m": f"poison {n}".encode(), "r": 0})
    reply: Any = redis_client.xreadgroup(CONSUMER_GROUP, "w1", {keys.stream(QUEUE): ">"}, count=250)
    ids = [i.decode() for _s, entries in reply for i, _f in entries]
    broker.max_redeliveries = -1  # every entry handed back is poison
    broker.requeue_entries(QUEUE, ids)
    assert redis_client.xlen(keys.stream(QUEUE)) == 0
    assert 10 <= redis_client.xlen(keys.dead_letters) <= 110
    newest = redis_client.xrevrange(keys.dead_letters, count=1)[0][1]
    assert newest[b"m"] == b"poison 249", "the cap dropped the newest instead of the oldest"

    for _ in range(250):
        redis_client.xadd(keys.stream(QUEUE), {"m": b"{garbage", "r": 0})
    consumer = _consumer(broker)
    for _ in range(260):
        next(consumer)
    assert redis_client.xlen(keys.stream(QUEUE)) == 0
    assert 10 <= redis_client.xlen(keys.dead_letters) <= 110


def test_dead_letters_older_than_the_age_cap_are_trimmed_when_another_is_filed(
    redis_client: redis.Redis, keys: Keys
) -> None:
    for n in range(1, 301):  # filed in 1970, by entry id: long past any age cap
        redis_client.xadd(keys.dead_letters, {"m": b"old", "queue": QUEUE, "reason": "r"}, id=f"{n}-0")
    broker = StreamsBroker(
        redis_client, keys, consumer_name="w1", middleware=[], dead_letter_cap=DeadLetterCap(1000, 3600)
    )
    broker.declare_queue(QUEUE)
    redis_client.xadd(keys.stream(QUEUE), {"m": b"{garbage", "r": 0})
    consumer = _consumer(broker)
    for _ in range(3):
        next(consumer)
    left = redis_client.xrange(keys.dead_letters)
    assert left[-1][1][b"m"] == b"{garbage"
    assert len(left) <= 101, f"{len(left)} dead letters kept; those from 1970 were not trimmed by age"
    assert GenqSettings().dead_letter_cap == DeadLetterCap(100_000, 30 * 24 * 3600)
