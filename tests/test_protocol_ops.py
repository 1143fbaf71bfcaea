"""The protocol's operations (jobcontract.protocol) on a real redis-server: each state change run
once through the operation its callers share, and the script layer itself (no Lua in .py files,
every .lua file loads, shared pieces included once)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract import protocol, scripts
from jobcontract.admission import Admission, QueueFull, build_message
from jobcontract.connection import connect_async
from jobcontract.keys import CONSUMER_GROUP, Keys, QueueRef, parse_queue, partition_of, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, GenerationResult, JobState, Lane, Timings, utc_from_micros
from jobcontract.prefix import prefix_fingerprint, prefix_of
from jobcontract.protocol.batch import BatchAdvance, BatchLease, BatchRecordJobs, MarkWritten
from jobcontract.protocol.entry import DeadLetterEntry, QueueEntry, entry_fields
from jobcontract.protocol.gateway import FileReserve, QuotaReserve
from jobcontract.protocol.jobs import Finish, Start, StartTicket, Submit
from jobcontract.protocol.liveness import LiveWorkers, Vouch
from jobcontract.protocol.operation import PACKAGE
from jobcontract.protocol.queue import Reclaim, Replay, Requeue, RescueMove
from jobcontract.routes import BackendRoute, ModelRoute
from tests.queues import partition_streams

ROOT = Path(__file__).resolve().parents[1]
# The operations on a queue's own stream: no prefix fingerprints, so the default tenant's jobs wait
# there (partitions by tenant and prefix shard are tests/test_fair_share.py's and test_prefix_placement.py's).
ROUTE = ModelRoute(
    name="tiny", backends=[BackendRoute(path="tiny-mlx"), BackendRoute(path="tiny.gguf")], prefix_chars=0
)
PREFIX_ROUTE = ROUTE.model_copy(update={"prefix_chars": 1024})
MLX_QUEUE = queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)
LLAMA_QUEUE = queue_name("tiny", Backend.LLAMACPP, Lane.INTERACTIVE)


def submit(client: redis.Redis, keys: Keys, *job_ids: str, max_queued: int = 100) -> Submit:
    requests = [GenerationRequest(model="tiny", prompt=f"p{i}", max_tokens=4) for i, _ in enumerate(job_ids)]
    op = Submit(Admission(keys, max_queued, 60, 30.0), requests, list(job_ids), lambda _: ROUTE)
    protocol.run(client, op)
    return op


def result(job_id: str, state: JobState = JobState.SUCCEEDED) -> GenerationResult:
    now = utc_from_micros(1_700_000_000_000_000)
    return GenerationResult(job_id=job_id, model="tiny", state=state, timings=Timings(enqueued_at=now, finished_at=now))


def deliver(client: redis.Redis, keys: Keys, queue: str, consumer: str) -> list[str]:
    """Read every waiting entry of the queue as `consumer` (creating the group); their ids."""
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
        client.xgroup_create(keys.stream(queue), CONSUMER_GROUP, id="0", mkstream=True)
    reply: Any = client.xreadgroup(CONSUMER_GROUP, consumer, {keys.stream(queue): ">"}, count=100) or []
    return [(i.decode() if isinstance(i, bytes) else i) for _s, entries in reply for i, _f in entries]


def first_entry(client: redis.Redis, key: str) -> tuple[str, dict[Any, Any]]:
    entries: Any = client.xrange(key)
    raw_id, fields = entries[0]
    return raw_id.decode(), fields


# -- the script layer ---------------------------------------------------------------------------------
def test_no_python_module_outside_tests_holds_lua() -> None:
    found = subprocess.run(
        [
            "grep",
            "-rlE",
            "--include=*.py",
            r"redis\.call|redis\.pcall|KEYS\[[0-9]",
            "genq",
            "jobcontract",
            "producer",
            "workers",
            "bench",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert found == []


def test_every_lua_file_loads(redis_client: redis.Redis) -> None:
    names = scripts.script_names(PACKAGE)
    assert "submit.lua" in names and "now.lua" in names
    for name in names:
        text = scripts.source(PACKAGE, name)
        assert "#include" not in text.replace("already included", "")
        assert redis_client.script_load(text)


def test_shared_lua_is_included_once_per_script() -> None:
    requeue = scripts.source(PACKAGE, "requeue.lua")  # move -> entry, fail_job -> now
    assert requeue.count("redis.call('TIME')") == 1
    assert requeue.count("local function add_entry") == 1
    submit_text = scripts.source(PACKAGE, "submit.lua")  # now, live (-> now again), entry
    assert submit_text.count("redis.call('TIME')") == 1
    assert re.search(r"local function live_workers", submit_text)


def test_a_client_registers_each_script_once(redis_client: redis.Redis) -> None:
    assert scripts.registered(redis_client, PACKAGE, "start.lua") is scripts.registered(
        redis_client, PACKAGE, "start.lua"
    )


# -- codecs -------------------------------------------------------------------------------------------
def test_queue_names_read_back_from_the_right() -> None:
    name = queue_name("org.model-1.5", Backend.LLAMACPP, Lane.BATCH)
    assert parse_queue(name) == QueueRef("org.model-1.5", Backend.LLAMACPP, Lane.BATCH)
    delayed = parse_queue(name + ".DQ")
    assert delayed is not None and delayed.delayed and delayed.pool == pool_name("org.model-1.5", Backend.LLAMACPP)
    assert delayed.on(Backend.MLX) == queue_name("org.model-1.5", Backend.MLX, Lane.BATCH) + ".DQ"
    assert parse_queue("tiny.nobackend.interactive") is None
    assert parse_queue("nodots") is None


def test_an_entry_written_by_python_is_handed_back_by_lua_with_one_more_redelivery(
    redis_client: redis.Redis, keys: Keys
) -> None:
    message = build_message("j1", GenerationRequest(model="tiny", prompt="x"), MLX_QUEUE, Lane.INTERACTIVE).encode()
    redis_client.xgroup_create(keys.stream(MLX_QUEUE), CONSUMER_GROUP, id="0", mkstream=True)
    redis_client.xadd(keys.stream(MLX_QUEUE), entry_fields(message))
    ids = deliver(redis_client, keys, MLX_QUEUE, "w1")
    assert protocol.run(redis_client, Requeue(keys, MLX_QUEUE, ids, max_redeliveries=5)) == 1
    _id, fields = first_entry(redis_client, keys.stream(MLX_QUEUE))
    assert QueueEntry.read(fields) == QueueEntry(message, 1)


# -- a job's own steps --------------------------------------------------------------------------------
def test_submit_start_finish(redis_client: redis.Redis, keys: Keys) -> None:
    op = submit(redis_client, keys, "j1")
    assert redis_client.xlen(keys.stream(MLX_QUEUE)) == 1  # no live pool: the first backend
    again = protocol.run(redis_client, op)
    assert again[0].job_id == "j1" and not again[0].duplicate  # a resent admission admits nothing twice
    assert redis_client.xlen(keys.stream(MLX_QUEUE)) == 1
    ticket = protocol.run(redis_client, Start(keys, "j1", "w1", Backend.MLX, MLX_QUEUE))
    assert isinstance(ticket, StartTicket) and ticket.remaining_s == pytest.approx(30.0, abs=1.0)
    assert protocol.run(redis_client, Finish(keys, result("j1"), None, 60)) is True
    assert protocol.run(redis_client, Finish(keys, result("j1", JobState.FAILED), None, 60)) is False
    assert protocol.run(redis_client, Start(keys, "j1", "w2", Backend.MLX, MLX_QUEUE)) is JobState.SUCCEEDED
    assert protocol.run(redis_client, Start(keys, "nope", "w2", Backend.MLX, MLX_QUEUE)) is None


def test_submit_refuses_a_full_queue_whole(redis_client: redis.Redis, keys: Keys) -> None:
    with pytest.raises(QueueFull):
        submit(redis_client, keys, "a", "b", max_queued=1)
    assert redis_client.keys(f"{keys.namespace}:job:*") == []


def test_submit_prefers_a_pool_with_a_live_worker(redis_client: redis.Redis, keys: Keys) -> None:
    pool = pool_name("tiny", Backend.LLAMACPP)
    protocol.run(redis_client, Vouch(keys, pool, workers=["w1"], ready=[True], ttl_ms=10_000))
    assert protocol.run(redis_client, LiveWorkers(keys, [("tiny", Backend.MLX), ("tiny", Backend.LLAMACPP)])) == [0, 1]
    (receipt,) = submit(redis_client, keys, "j1").parse([[b"queued", b"j1", LLAMA_QUEUE.encode()]])
    assert receipt.queue == LLAMA_QUEUE
    assert redis_client.xlen(keys.stream(LLAMA_QUEUE)) == 1


def test_a_worker_vouched_unready_is_alive_but_not_live(redis_client: redis.Redis, keys: Keys) -> None:
    pool = pool_name("tiny", Backend.MLX)
    assert protocol.run(redis_client, Vouch(keys, pool, workers=["w1"], ready=[False], ttl_ms=10_000)) == 1
    assert redis_client.exists(keys.alive("w1"))
    assert protocol.run(redis_client, LiveWorkers(keys, [("tiny", Backend.MLX)])) == [0]


def test_submit_puts_the_prefix_fingerprint_in_every_queued_message(redis_client: redis.Redis, keys: Keys) -> None:
    """Placement reads it from the queue entry: the message's options, in every candidate queue's
    message alike, and kept when the entry is handed back."""
    shared = "Extract every date from the letter below. " * 30
    requests = [
        GenerationRequest(model="tiny", prompt=shared + "Dear Ann,"),
        GenerationRequest(model="tiny", prompt=shared + "Dear Bob,", lane=Lane.BATCH),
        GenerationRequest(
            model="tiny", messages=[{"role": "system", "content": shared}, {"role": "user", "content": "x"}]
        ),
        GenerationRequest(model="tiny", prompt="Translate. " + shared),
    ]
    op = Submit(Admission(keys, 100, 60, 30.0), requests, ["a", "b", "c", "d"], lambda _: PREFIX_ROUTE)
    protocol.run(redis_client, op)
    messages, partitions = {}, {}
    for queue in (MLX_QUEUE, queue_name("tiny", Backend.MLX, Lane.BATCH)):
        for stream in partition_streams(redis_client, keys, queue):
            for _id, fields in redis_client.xrange(stream):
                entry = QueueEntry.read(fields)
                assert entry.message is not None
                message = dramatiq.Message.decode(entry.message)
                messages[message.message_id] = message
                partitions[message.message_id] = stream
    prefixes = {job: prefix_of(m.options) for job, m in messages.items()}
    assert prefixes["a"] == prefixes["b"] == prefix_fingerprint(requests[0])
    assert prefixes["a"] is not None and len({prefixes["a"], prefixes["c"], prefixes["d"]}) == 3
    # Each waits in its prefix shard's partition of its queue (the default tenant's).
    for job in "abcd":
        queue = MLX_QUEUE if job != "b" else queue_name("tiny", Backend.MLX, Lane.BATCH)
        assert partitions[job] == keys.partition(queue, partition_of(None, prefixes[job]))
    # Every candidate queue's message carries it (the script queues one of them).
    candidates = [dramatiq.Message.decode(m) for m in op.args()[14:16]]
    assert [prefix_of(m.options) for m in candidates] == [prefixes["a"]] * 2
    # Handed back after a dead worker: the same message, the same fingerprint, the same partition.
    a_partition = partition_of(None, prefixes["a"])
    redis_client.set(keys.alive("w1"), 1)
    redis_client.xreadgroup(CONSUMER_GROUP, "w1", {keys.partition(MLX_QUEUE, a_partition): ">"}, count=10)
    redis_client.delete(keys.alive("w1"))
    assert protocol.run(redis_client, Reclaim(keys, MLX_QUEUE, "w1", 5, partition=a_partition)) == 1
    back = [QueueEntry.read(f).message for _i, f in redis_client.xrange(keys.partition(MLX_QUEUE, a_partition))]
    assert [prefix_of(dramatiq.Message.decode(m).options) for m in back if m] == [prefixes["a"]]


def test_a_model_routed_without_fingerprints_queues_messages_without_one(redis_client: redis.Redis, keys: Keys) -> None:
    route = ROUTE.model_copy(update={"prefix_chars": 0})
    request = GenerationRequest(model="tiny", prompt="x" * 2000)
    protocol.run(redis_client, Submit(Admission(keys, 100, 60, 30.0), [request], ["j"], lambda _: route))
    _id, fields = first_entry(redis_client, keys.stream(MLX_QUEUE))
    raw = QueueEntry.read(fields).message
    assert raw is not None and dramatiq.Message.decode(raw).options == {}


# -- queue entries ------------------------------------------------------------------------------------
def test_reclaim_waits_for_the_liveness_key_then_hands_back(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "j1")
    redis_client.set(keys.alive("w1"), 1)
    deliver(redis_client, keys, MLX_QUEUE, "w1")
    reclaim = Reclaim(keys, MLX_QUEUE, "w1", max_redeliveries=5)
    assert protocol.run(redis_client, reclaim) is None
    redis_client.delete(keys.alive("w1"))
    assert protocol.run(redis_client, reclaim) == 1
    assert deliver(redis_client, keys, MLX_QUEUE, "w2") != []


def test_a_poison_entry_goes_to_dead_letters_and_its_job_fails(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "j1")
    ids = deliver(redis_client, keys, MLX_QUEUE, "w1")
    assert protocol.run(redis_client, Requeue(keys, MLX_QUEUE, ids, max_redeliveries=0)) == 0
    assert redis_client.xlen(keys.stream(MLX_QUEUE)) == 0
    _id, fields = first_entry(redis_client, keys.dead_letters)
    letter = DeadLetterEntry.read(fields)
    assert letter.queue == MLX_QUEUE and "handed back 0 times" in letter.reason
    assert dramatiq.Message.decode(letter.message).message_id == "j1"
    failed = GenerationResult.model_validate_json(redis_client.hget(keys.job("j1"), "result") or b"")
    assert failed.state is JobState.FAILED and failed.error is not None and failed.error.type == "worker_died"
    events: Any = redis_client.xrange(keys.events("j1"))
    assert events[-1][1][b"type"] == b"done"


def test_rescue_move_moves_only_an_entry_still_pending(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "j1")
    _id, queued = first_entry(redis_client, keys.stream(MLX_QUEUE))
    (entry_id,) = deliver(redis_client, keys, MLX_QUEUE, "rescuer")
    message = dramatiq.Message.decode(QueueEntry.read(queued).message or b"").copy(queue_name=LLAMA_QUEUE).encode()
    move = RescueMove(keys, MLX_QUEUE, LLAMA_QUEUE, entry_id, message)
    assert protocol.run(redis_client, move) is True
    assert protocol.run(redis_client, move) is False
    assert redis_client.xlen(keys.stream(MLX_QUEUE)) == 0
    _id, fields = first_entry(redis_client, keys.stream(LLAMA_QUEUE))
    assert QueueEntry.read(fields) == QueueEntry(message, 0)


def test_replay_requeues_a_failed_job_once(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "j1")
    ids = deliver(redis_client, keys, MLX_QUEUE, "w1")
    protocol.run(redis_client, Requeue(keys, MLX_QUEUE, ids, max_redeliveries=0))
    entry_id, fields = first_entry(redis_client, keys.dead_letters)
    replay = Replay(
        keys,
        entry_id=entry_id,
        job_id="j1",
        message=DeadLetterEntry.read(fields).message,
        model="tiny",
        lane=Lane.INTERACTIVE.value,
        queue=MLX_QUEUE,
        timeout_us=30_000_000,
        ttl_s=60,
        batch_id=None,
    )
    first = protocol.run(redis_client, replay)
    assert (first.outcome, first.previous_state) == ("replayed", "failed")
    assert redis_client.hget(keys.job("j1"), "state") == b"queued"
    assert redis_client.xlen(keys.stream(MLX_QUEUE)) == 1
    assert protocol.run(redis_client, replay).outcome == "gone"


# -- the gateway's and the batch's ------------------------------------------------------------------
def test_quota_reserve_holds_its_bound(redis_server: LocalRedis, keys: Keys) -> None:
    async def scenario() -> list[bool]:
        client = connect_async(redis_server.url)
        try:
            key = keys.caller_jobs("k")
            return [await protocol.run_async(client, QuotaReserve(key, f"j{i}", 2, 60)) for i in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [True, True, False]


def test_file_reserve_checks_files_and_bytes(redis_client: redis.Redis, keys: Keys) -> None:
    first = protocol.run(redis_client, FileReserve(keys, "t", "f1", 10, max_files=2, max_bytes=15, ttl_s=60))
    assert (first.outcome, first.count, first.total) == ("ok", 0, 0)
    assert redis_client.ttl(keys.file_content("f1")) > 0
    too_big = protocol.run(redis_client, FileReserve(keys, "t", "f2", 10, max_files=2, max_bytes=15, ttl_s=60))
    assert (too_big.outcome, too_big.count, too_big.total) == ("bytes", 1, 10)
    redis_client.delete(keys.file_content("f1"))  # its file is gone: its place is given back
    assert protocol.run(redis_client, FileReserve(keys, "t", "f2", 10, 2, 15, 60)).outcome == "ok"


def submit_owned(client: redis.Redis, keys: Keys, job_id: str, *, owner: str | None, key: str | None = None) -> Any:
    request = GenerationRequest(model="tiny", prompt="p", max_tokens=4, idempotency_key=key)
    op = Submit(Admission(keys, 2, 60, 30.0), [request], [job_id], lambda _: ROUTE, tenant=owner)
    return protocol.run(client, op)


def test_admission_names_the_owner_and_never_changes_one(redis_client: redis.Redis, keys: Keys) -> None:
    """The gateway's tenant is written by the admission itself (it was a second script, ClaimJob)."""
    submit_owned(redis_client, keys, "j1", owner="a")
    assert redis_client.hget(keys.job("j1"), "tenant") == b"a"
    [again] = submit_owned(redis_client, keys, "j1", owner="b")  # the same id again: the earlier job answers
    assert again.job_id == "j1"
    assert redis_client.hget(keys.job("j1"), "tenant") == b"a"  # an owner is never changed
    submit_owned(redis_client, keys, "j2", owner=None, key="k")  # made outside the gateway: no owner
    assert redis_client.hget(keys.job("j2"), "tenant") is None
    [answered] = submit_owned(redis_client, keys, "j3", owner="c", key="k")  # answered by j2, which had none
    assert (answered.job_id, answered.duplicate) == ("j2", True)
    assert redis_client.hget(keys.job("j2"), "tenant") == b"c"
    assert not redis_client.exists(keys.job("j3"))
    submit_owned(redis_client, keys, "j5", owner="a")  # a's lane holds its bound (2) now
    with pytest.raises(QueueFull):  # a refusal writes nothing, the owner neither
        submit_owned(redis_client, keys, "j4", owner="a")
    assert not redis_client.exists(keys.job("j4"))


def test_batch_operations(redis_client: redis.Redis, keys: Keys) -> None:
    assert protocol.run(redis_client, BatchLease(keys, "b1", "me", 10_000)) is True
    assert protocol.run(redis_client, BatchLease(keys, "b1", "other", 10_000)) is False
    assert protocol.run(redis_client, BatchAdvance(keys, "b1", "in_progress", 1)) is None  # no such batch
    redis_client.hset(keys.batch("b1"), "status", "validating")
    assert protocol.run(redis_client, BatchAdvance(keys, "b1", "cancelling", 1)) == "cancelling"
    assert protocol.run(redis_client, BatchAdvance(keys, "b1", "in_progress", 2)) == "cancelling"
    assert protocol.run(redis_client, BatchRecordJobs(keys, "b1", {"j1": "a", "j2": "b"}, 2, 60)) == 2
    assert protocol.run(redis_client, BatchRecordJobs(keys, "b1", {"j2": "b"}, 3, 60)) == 2
    assert redis_client.hget(keys.batch("b1"), "submitted_line") == b"3"
    submit(redis_client, keys, "j1")
    assert protocol.run(redis_client, MarkWritten(keys, ["j1", "gone"], "batch_written")) == 2
    assert redis_client.hget(keys.job("j1"), "batch_written") == b"1"
    assert not redis_client.exists(keys.job("gone"))
