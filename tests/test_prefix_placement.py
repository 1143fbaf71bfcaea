"""Prompt-prefix placement through the one scheduler (jobcontract.scheduling, take.lua): jobs that share
a prefix wait in their prefix shard's partition, and a worker takes the shards it owns (rendezvous
hashing over the pool's live workers) before anyone else's. On a real redis-server first, then on
real mlx workers: one prefix's jobs land on one worker while it lives, move when it is killed with
nothing lost, spill to others when it is saturated, and interactive jobs still go first."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dramatiq
import psutil
import pytest
import redis

from genq.local_worker import port_of
from jobcontract import protocol
from jobcontract.admission import Admission
from jobcontract.broker import StreamsBroker
from jobcontract.keys import CONSUMER_GROUP, Keys, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, JobState, Lane
from jobcontract.protocol.entry import QueueEntry
from jobcontract.protocol.jobs import Submit
from jobcontract.protocol.liveness import Vouch
from jobcontract.protocol.take import Take
from jobcontract.routes import BackendRoute, ModelRoute
from jobcontract.scheduling import Placement, plan
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import WorkerHandle, start_worker, wait_until

ROUTE = ModelRoute(name="tiny", backends=[BackendRoute(path="tiny-mlx")])
QUEUE = queue_name("tiny", Backend.MLX, Lane.BATCH)
POOL = pool_name("tiny", Backend.MLX)


def instruction(n: int) -> str:
    return f"Instruction {n}: classify the text below by the rubric. " * 25


def submit(client: redis.Redis, keys: Keys, prompts: list[str], *, lane: Lane = Lane.BATCH) -> list[str]:
    requests = [GenerationRequest(model="tiny", prompt=p, max_tokens=4, lane=lane) for p in prompts]
    ids = [f"j{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    protocol.run(client, Submit(Admission(keys, 10_000, 60, 30.0), requests, ids, lambda _: ROUTE))
    return ids


def live(client: redis.Redis, keys: Keys, *workers: str) -> None:
    protocol.run(client, Vouch(keys, POOL, workers=list(workers), ready=[True] * len(workers), ttl_ms=60_000))


def with_group(client: redis.Redis, keys: Keys) -> None:
    """The queue's own stream with its group, as a worker's broker declares it."""
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
        client.xgroup_create(keys.stream(QUEUE), CONSUMER_GROUP, id="0", mkstream=True)


def take_all(client: redis.Redis, keys: Keys, worker: str, *, steal_after_s: float = 60.0) -> list[str]:
    """Every prompt `worker` is given, one take after another, until it is given nothing."""
    with_group(client, keys)
    prompts = []
    while True:
        taken = protocol.run(client, Take(keys, worker, 5, plan(QUEUE, Placement(steal_after_s=steal_after_s))))
        if not taken.entries:
            return prompts
        for entry in taken.entries:
            message = dramatiq.Message.decode(QueueEntry.read(entry.fields).message or b"")
            prompts.append(message.kwargs["request"]["prompt"])


def test_each_worker_takes_the_prefixes_it_owns_and_no_other_while_they_are_young(
    redis_client: redis.Redis, keys: Keys
) -> None:
    live(redis_client, keys, "w1", "w2")
    prompts = [instruction(n) + f"text {i}" for n in range(12) for i in range(3)]
    submit(redis_client, keys, prompts)
    first = take_all(redis_client, keys, "w1")
    second = take_all(redis_client, keys, "w2")
    assert sorted(first + second) == sorted(prompts)  # nothing lost, nothing twice
    by_worker = {w: {p.split(":")[0] for p in got} for w, got in (("w1", first), ("w2", second))}
    assert by_worker["w1"] and by_worker["w2"], "12 prefixes over two workers: each owns some"
    assert not by_worker["w1"] & by_worker["w2"], "a prefix is one worker's"


def test_one_tenants_prefixes_are_served_first_come_first_served(redis_client: redis.Redis, keys: Keys) -> None:
    """Each prefix has its own partition; within one tenant none goes ahead of an older job of
    another (a busy prefix must not starve a quiet one)."""
    prompts = [instruction(n % 5) + f"text {n}" for n in range(15)]
    for prompt in prompts:  # one at a time, each in its own millisecond (a stream id's clock)
        submit(redis_client, keys, [prompt])
        time.sleep(0.002)
    assert take_all(redis_client, keys, "w1") == prompts


def test_a_dead_owners_prefixes_belong_to_the_live_at_once(redis_client: redis.Redis, keys: Keys) -> None:
    live(redis_client, keys, "w1", "w2")
    prompts = [instruction(n) + "text" for n in range(12)]
    submit(redis_client, keys, prompts)
    redis_client.zrem(keys.pool(POOL), "w2")  # its vouch lapsed
    assert sorted(take_all(redis_client, keys, "w1")) == sorted(prompts)


def test_a_worker_with_room_steals_what_waited_past_the_bound_after_its_own(
    redis_client: redis.Redis, keys: Keys
) -> None:
    live(redis_client, keys, "w1", "w2")
    submit(redis_client, keys, [instruction(n) + "text" for n in range(12)])
    own = take_all(redis_client, keys, "w1")
    placed = plan(QUEUE, Placement(steal_after_s=0.3))
    held_back = protocol.run(redis_client, Take(keys, "w1", 5, placed))
    assert held_back.entries == [] and held_back.wake_ms is not None and 0 < held_back.wake_ms <= 300
    time.sleep(0.35)
    stolen = take_all(redis_client, keys, "w1", steal_after_s=0.3)
    assert len(own) + len(stolen) == 12 and stolen  # w2 never came: w1 took its jobs, after its own


def test_a_prefix_a_worker_took_lately_is_read_as_its_own(redis_client: redis.Redis, keys: Keys) -> None:
    """A worker that stole a prefix has it in its server's cache now: it keeps taking that partition
    at once (no steal bound), instead of every thief stealing a little of every prefix."""
    live(redis_client, keys, "w1", "w2")
    with_group(redis_client, keys)
    submit(redis_client, keys, [instruction(n) + "text" for n in range(12)])
    theirs = [e for e in protocol.run(redis_client, Take(keys, "w2", 20, plan(QUEUE))).entries]
    assert theirs, "w2 owns some of 12 prefixes"
    partition = theirs[0].stream.split(":part:")[1]
    prompt = dramatiq.Message.decode(QueueEntry.read(theirs[0].fields).message or b"").kwargs["request"]["prompt"]
    take_all(redis_client, keys, "w1")  # w1's own prefixes
    submit(redis_client, keys, [prompt])  # another job of that prefix: w2's shard
    young = plan(QUEUE, Placement(steal_after_s=60))
    assert protocol.run(redis_client, Take(keys, "w1", 5, young)).entries == []
    warm = protocol.run(redis_client, Take(keys, "w1", 5, young, warm=(partition,))).entries
    assert [e.stream for e in warm] == [theirs[0].stream]


def test_without_affinity_any_worker_takes_any_prefix(redis_client: redis.Redis, keys: Keys) -> None:
    live(redis_client, keys, "w1", "w2")
    submit(redis_client, keys, [instruction(n) + "text" for n in range(12)])
    with_group(redis_client, keys)
    flat = plan(QUEUE, Placement(prefix_affinity=False))
    assert len(protocol.run(redis_client, Take(keys, "w1", 20, flat)).entries) == 12


# -- on real workers -------------------------------------------------------------------------------
@pytest.fixture
def two_workers(settings: GenqSettings, tmp_path: Path) -> Any:
    handle = start_worker(settings, tmp_path, processes=2, concurrency=4)
    try:
        yield handle
    finally:
        handle.stop()


def ask(prefix: int, i: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": instruction(prefix) + f"text {i}", "max_tokens": 8, "lane": "batch", **extra}


def test_one_prefix_runs_on_one_worker_and_moves_when_it_dies(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    # Two slots a worker (four with prefetch) and no stealing within the test: 3 prefixes x 2 jobs,
    # interleaved, in three rounds, each prefix always on the worker that owns it. Without placement
    # a round goes to whichever worker reads first.
    handle = start_worker(settings, tmp_path, processes=2, concurrency=2, env={"GENQ_PREFIX_STEAL_AFTER_S": "60"})
    try:
        workers_of: dict[int, set[str | None]] = {p: set() for p in range(3)}
        for round_ in range(3):
            prefixes = [p for _ in range(2) for p in range(3)]
            job_ids = client.submit_many([ask(p, 10 * round_ + i) for i, p in enumerate(prefixes)])
            results = client.results(job_ids, timeout=120)
            assert all(r.ok for r in results), handle.log()
            for result, prefix in zip(results, prefixes, strict=True):
                workers_of[prefix].add(result.worker)
        assert all(len(w) == 1 for w in workers_of.values()), workers_of
        (owner,) = workers_of[0]
        assert owner is not None
        # Kill the worker process that owns prefix 0 (with its server) while its jobs wait and run.
        job_ids = client.submit_many([ask(0, i, max_tokens=200) for i in range(6)])
        _kill_worker_named(handle, owner)
        results = client.results(job_ids, timeout=180)
    finally:
        handle.stop()
    assert all(r.state is JobState.SUCCEEDED for r in results), [r.error for r in results]
    assert len({r.job_id for r in results}) == 6
    assert {r.worker for r in results} - {owner}, "the dead owner's prefix moved to a live worker"


def test_a_saturated_owner_spills_its_prefix_to_the_other_worker(
    settings: GenqSettings, client: Client, two_workers: WorkerHandle
) -> None:
    results = client.results(client.submit_many([ask(7, i, max_tokens=64) for i in range(24)]), timeout=240)
    assert all(r.state is JobState.SUCCEEDED for r in results), two_workers.log()
    spread = Counter(r.worker for r in results)
    assert len(spread) == 2, spread  # 24 jobs of one prefix, 4 slots a worker: the other took its share


def test_interactive_jobs_still_go_before_batch_lines(
    settings: GenqSettings, client: Client, two_workers: WorkerHandle
) -> None:
    """Interactive jobs of a prefix whose batch lines fill both workers start before the batch lines
    still waiting: a freed slot takes a prefetched interactive job before a prefetched batch line."""
    batch = client.submit_many([ask(5, i, max_tokens=128) for i in range(80)])
    assert wait_until(lambda: client.status(batch[0]).state is not JobState.QUEUED, 60)
    urgent = client.results(client.submit_many([ask(5, 100 + i, lane="interactive") for i in range(4)]), timeout=180)
    done = client.results(batch, timeout=600)
    assert all(r.ok for r in [*urgent, *done])
    last_urgent = max(r.timings.started_at for r in urgent if r.timings.started_at)
    after = [r for r in done if r.timings.started_at and r.timings.started_at > last_urgent]
    assert len(after) >= 20, f"only {len(after)} of 80 batch lines started after the interactive jobs"


def _kill_worker_named(handle: WorkerHandle, name: str) -> None:
    """SIGKILL the worker process that logged it serves as `name`, with its server."""
    log = handle.log_path.read_text(errors="replace")
    match = re.search(re.escape(name) + r" INFO \S+: serving \S+ on \S+ at http://127\.0\.0\.1:(\d+)", log)
    assert match is not None, log[-3000:]
    port = int(match.group(1))
    server = next(pid for pid in handle.server_pids() if port_of(pid) == port)
    worker = psutil.Process(server).ppid()
    os.kill(worker, signal.SIGKILL)
    os.kill(server, signal.SIGKILL)


def test_a_blocked_consumer_wakes_for_a_prefix_its_tenant_never_used_before(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Every prefix shard of a tenant is made with its first one, so a consumer blocked on the queue
    wakes for a job of a new prefix in that block, not a block later (a 1 s latency before)."""
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    submit(redis_client, keys, [instruction(0) + "first"])
    consumer = broker.consume(QUEUE, prefetch=4, timeout=10_000)
    first = next(consumer)
    assert first is not None
    consumer.ack(first)
    later = threading.Timer(0.3, lambda: submit(redis_client, keys, [instruction(99) + "new prefix"]))
    later.start()
    try:
        consumer.timeout_ms = 5_000  # type: ignore[attr-defined]
        got = next(consumer)  # one take and one blocking read: woken by the new job, not timed out
    finally:
        later.cancel()
        later.join()  # its submit is done (or never started) before the test's Redis goes
    assert got is not None and "new prefix" in got.kwargs["request"]["prompt"]
