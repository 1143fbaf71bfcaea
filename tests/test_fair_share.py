"""The scheduler (jobcontract.scheduling and the Take operation) on a real redis-server: tenants of one
queue are served in turn, weighted by their shares, an idle tenant hoards no credit, an age-bounded
tier gives only what waited long enough, and every path that moves an entry keeps it in its
tenant's lane."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import dramatiq
import redis

from jobcontract import protocol, scripts
from jobcontract.admission import Admission
from jobcontract.broker import StreamsBroker
from jobcontract.keys import CONSUMER_GROUP, PREFIX_SHARDS, Keys, pool_name, queue_name
from jobcontract.models import Backend, GenerationRequest, JobState, Lane
from jobcontract.protocol.entry import QueueEntry
from jobcontract.protocol.jobs import Submit
from jobcontract.protocol.liveness import Vouch
from jobcontract.protocol.operation import PACKAGE
from jobcontract.protocol.queue import Reclaim, Requeue, RescueMove
from jobcontract.protocol.take import Take
from jobcontract.routes import BackendRoute, ModelRoute
from jobcontract.scheduling import Placement, Select, TakePlan, Tier, plan
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import start_worker

# No prefix fingerprints here: one lane per tenant (prefix shards are tests/test_prefix_placement.py's).
ROUTE = ModelRoute(
    name="tiny", backends=[BackendRoute(path="tiny-mlx"), BackendRoute(path="tiny.gguf")], prefix_chars=0
)
QUEUE = queue_name("tiny", Backend.MLX, Lane.BATCH)
LLAMA_QUEUE = queue_name("tiny", Backend.LLAMACPP, Lane.BATCH)


def submit(client: redis.Redis, keys: Keys, tenant: str | None, count: int, *, prefix: str | None = None) -> None:
    requests = [GenerationRequest(model="tiny", prompt="p", max_tokens=4, lane=Lane.BATCH) for _ in range(count)]
    ids = [f"{prefix or tenant or 'default'}-{i}" for i in range(count)]
    protocol.run(client, Submit(Admission(keys, 10_000, 60, 30.0), requests, ids, lambda _: ROUTE, tenant=tenant))


def take(client: redis.Redis, keys: Keys, room: int = 1, *, consumer: str = "w1", tiers: TakePlan | None = None) -> Any:
    with_group(client, keys)
    return protocol.run(client, Take(keys, consumer, room, tiers or plan(QUEUE)))


def with_group(client: redis.Redis, keys: Keys) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
        client.xgroup_create(keys.stream(QUEUE), CONSUMER_GROUP, id="0", mkstream=True)


def owners(taken: Any) -> list[str]:
    return [dramatiq.Message.decode(QueueEntry.read(e.fields).message or b"").message_id.split("-")[0] for e in taken]


def take_one_by_one(client: redis.Redis, keys: Keys, n: int) -> list[str]:
    return [owner for _ in range(n) for owner in owners(take(client, keys).entries)]


def test_a_small_tenant_behind_a_large_one_is_served_in_turn(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "big", 50)
    submit(redis_client, keys, "small", 5)
    order = take_one_by_one(redis_client, keys, 12)
    assert order.count("small") == 5  # first come first served would give 12 of big's first
    assert order[:10].count("small") == 5 and "small" not in order[10:]
    assert redis_client.smembers(keys.partitions(QUEUE)) == {b"big", b"small"}


def test_several_at_once_are_taken_in_turn_too(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "big", 20)
    submit(redis_client, keys, "small", 2)
    submit(redis_client, keys, None, 2)  # the default tenant's lane is the queue's own stream
    taken = owners(take(redis_client, keys, room=6).entries)
    assert sorted(taken) == sorted(["big"] * 2 + ["small"] * 2 + ["default"] * 2)


def test_shares_weight_the_turns(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.hset(keys.tenant_shares, mapping={"gold": 3})
    submit(redis_client, keys, "gold", 30)
    submit(redis_client, keys, "bronze", 30)
    order = take_one_by_one(redis_client, keys, 16)
    assert order.count("gold") == 12 and order.count("bronze") == 4


def test_an_idle_tenant_hoards_no_credit(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "steady", 40)
    assert set(take_one_by_one(redis_client, keys, 20)) == {"steady"}
    submit(redis_client, keys, "late", 20)  # it was idle while steady took 20: no burst of 20 for it
    order = take_one_by_one(redis_client, keys, 10)
    assert 4 <= order.count("late") <= 6  # in turn, within one job (ties); with credit it would take all 10


def test_every_worker_of_the_pool_shares_one_account(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "big", 20)
    submit(redis_client, keys, "small", 4)
    order = [o for i in range(8) for o in owners(take(redis_client, keys, consumer=f"w{i % 2}").entries)]
    assert order.count("small") == 4


def test_an_age_bound_tier_takes_only_what_waited_long_enough(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "a", 2)
    bounded = TakePlan((Tier(QUEUE, min_age_ms=60_000),))
    taken = take(redis_client, keys, room=5, tiers=bounded)
    assert taken.entries == [] and taken.streams == []  # nothing to block on: a blocking read takes anything
    assert len(take(redis_client, keys, room=5, tiers=TakePlan((Tier(QUEUE, min_age_ms=0),))).entries) == 2


def test_the_plan_bounds_only_a_swap_while_another_worker_has_the_model() -> None:
    flat = Placement(prefix_affinity=False)
    assert plan(QUEUE, flat).tiers == (Tier(QUEUE),)
    assert plan(QUEUE, replace(flat, loaded_here=False, loaded_elsewhere=False)).tiers == (Tier(QUEUE),)
    bounded = replace(flat, loaded_here=False, loaded_elsewhere=True, max_swap_wait_s=2.5)
    assert plan(QUEUE, bounded).tiers == (Tier(QUEUE, min_age_ms=2500),)
    placed = Placement(steal_after_s=0.25)
    assert plan(QUEUE, placed).tiers == (Tier(QUEUE, 0, Select.MINE), Tier(QUEUE, 250, Select.THEIRS))
    # Several models on this worker: a model to swap in waits its turn while the models in its way
    # have work (a turn's length: a backlog's jobs are all old at once), then takes the jobs that
    # waited the bound (a job's age: moments with nothing to do do not restart its wait).
    busy = replace(flat, loaded_here=False, busy_here=True, max_swap_wait_s=2.5, since_turn_s=1.0)
    assert plan(QUEUE, busy) == TakePlan((), block=False)
    assert plan(QUEUE, replace(busy, since_turn_s=2.5)).tiers == (Tier(QUEUE, min_age_ms=2500),)  # its turn
    assert plan(QUEUE, replace(busy, swap_needed=False)).tiers == (Tier(QUEUE),)  # it fits beside them
    assert plan(QUEUE, replace(busy, busy_here=False)).tiers == (Tier(QUEUE),)  # an idle worker takes anything
    # ... the jobs that waited what reloading its idle models would cost (less their idle time):
    assert plan(QUEUE, replace(busy, busy_here=False, swap_after_s=1.5)).tiers == (Tier(QUEUE, min_age_ms=1500),)
    assert plan(QUEUE, replace(flat, loaded_here=False, committed_here=True)).tiers == ()  # its jobs await a load
    swapping = replace(placed, loaded_here=False, loaded_elsewhere=True, max_swap_wait_s=2.5)
    assert plan(QUEUE, swapping).tiers == (Tier(QUEUE, 2500, Select.MINE), Tier(QUEUE, 2500, Select.THEIRS))


def test_entries_handed_back_stay_in_their_tenants_lane(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "t1", 2)
    taken = take(redis_client, keys, room=2).entries
    lane = keys.partition(QUEUE, "t1")
    assert {e.stream for e in taken} == {lane}
    assert protocol.run(redis_client, Requeue(keys, QUEUE, [taken[0].entry_id], 5, partition="t1")) == 1
    redis_client.set(keys.alive("w1"), 1)
    assert protocol.run(redis_client, Reclaim(keys, QUEUE, "w1", 5, partition="t1")) is None  # still vouched for
    redis_client.delete(keys.alive("w1"))
    assert protocol.run(redis_client, Reclaim(keys, QUEUE, "w1", 5, partition="t1")) == 1
    assert redis_client.xlen(lane) == 2 and redis_client.xlen(keys.stream(QUEUE)) == 0
    assert owners(take(redis_client, keys, room=5, consumer="w2").entries) == ["t1", "t1"]


def test_a_rescued_entry_moves_to_the_same_tenants_lane_of_the_target(redis_client: redis.Redis, keys: Keys) -> None:
    submit(redis_client, keys, "t1", 1)
    (entry,) = take(redis_client, keys, consumer="rescuer").entries
    message = dramatiq.Message.decode(QueueEntry.read(entry.fields).message or b"").copy(queue_name=LLAMA_QUEUE)
    move = RescueMove(keys, QUEUE, LLAMA_QUEUE, entry.entry_id, message.encode(), partition="t1")
    assert protocol.run(redis_client, move) is True
    assert redis_client.xlen(keys.partition(LLAMA_QUEUE, "t1")) == 1
    assert redis_client.smembers(keys.partitions(LLAMA_QUEUE)) == {b"t1"}
    assert redis_client.xinfo_groups(keys.partition(LLAMA_QUEUE, "t1"))[0]["name"] == CONSUMER_GROUP.encode()


def test_the_broker_enqueues_a_retry_into_its_tenants_lane(redis_client: redis.Redis, keys: Keys) -> None:
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    pool = pool_name("tiny", Backend.MLX)
    protocol.run(redis_client, Vouch(keys, pool, workers=["w1"], ready=[True], ttl_ms=10_000))
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=QUEUE, actor_name="a", args=(), kwargs={"tenant": "t9"}, options={}, message_id="t9-0"
    )
    broker.enqueue(message)
    assert redis_client.xlen(keys.partition(QUEUE, "t9")) == 1
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    delivered = next(consumer)
    assert delivered is not None and delivered.message_id == "t9-0" and delivered.partition == "t9"  # type: ignore[attr-defined]
    consumer.ack(delivered)
    assert redis_client.xlen(keys.partition(QUEUE, "t9")) == 0
    assert broker.partition_streams(QUEUE) == [keys.stream(QUEUE), keys.partition(QUEUE, "t9")]


def test_a_consumer_blocked_on_an_empty_queue_wakes_for_a_new_tenants_lane(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """The blocking read covers the lanes the last take saw; a lane made meanwhile is found by the
    next take, at most one block later."""
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    assert next(consumer) is None
    submit(redis_client, keys, "newcomer", 1)
    got = [m for m in (next(consumer) for _ in range(3)) if m is not None]
    assert [m.message_id for m in got] == ["newcomer-0"]


def test_the_lua_group_name_is_the_consumer_group() -> None:
    entry = scripts.source(PACKAGE, "entry.lua")
    match = re.search(r"local GROUP = '([^']+)'", entry)
    assert match is not None and match.group(1) == CONSUMER_GROUP


def test_a_worker_serves_a_late_small_tenant_long_before_a_large_one_is_done(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    """One real mlx worker with one slot: a tenant's 40 batch jobs, then another's 4. First come first
    served would finish the 4 last; in turn, they finish among the first dozen or so (the worker holds
    at most a slot and two prefetched jobs of the first tenant when they arrive)."""
    worker = start_worker(settings, tmp_path, concurrency=1)
    try:
        route = settings.routes.get("tiny")

        def jobs(tenant: str, n: int) -> list[str]:
            requests = [
                GenerationRequest(model="tiny", prompt=f"{tenant} {i}", max_tokens=8, lane=Lane.BATCH) for i in range(n)
            ]
            receipts = client.store.submit_many(
                requests, route_for=lambda _: route, default_timeout_s=120, tenant=tenant
            )
            return [r.job_id for r in receipts]

        big = jobs("big", 40)
        small = jobs("small", 4)
        results = client.store.wait_many([*big, *small], timeout_s=240)
    finally:
        worker.stop()
    assert all(r.state is JobState.SUCCEEDED for r in results.values()), worker.log()
    finished = sorted(results, key=lambda job_id: results[job_id].timings.finished_at or 0)
    last_small = max(finished.index(job_id) for job_id in small)
    assert last_small < 16, f"the small tenant's last job finished {last_small + 1}th of {len(finished)}"


def test_a_take_whose_reply_was_lost_is_adopted_from_every_partition(redis_client: redis.Redis, keys: Keys) -> None:
    """Redis ran a take for this consumer and its reply never arrived (a restart, a re-sent script):
    the entries are pending on its name in two tenants' partitions; its orphan check takes them."""
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    submit(redis_client, keys, "t1", 2)
    submit(redis_client, keys, "t2", 2)
    lost = protocol.run(redis_client, Take(keys, "w1", 3, plan(QUEUE)))  # the reply nobody read
    assert len(lost.entries) == 3
    consumer = broker.consume(QUEUE, prefetch=10, timeout=100)
    consumer.next_orphan_check = 0.0  # type: ignore[attr-defined]
    got = [m for m in (next(consumer) for _ in range(6)) if m is not None]
    assert sorted(m.message_id for m in got) == ["t1-0", "t1-1", "t2-0", "t2-1"]  # each once
    for message in got:
        consumer.ack(message)
    assert all(redis_client.xlen(s) == 0 for s in broker.partition_streams(QUEUE))


def test_a_partition_deleted_while_listed_does_not_wedge_its_consumer(redis_client: redis.Redis, keys: Keys) -> None:
    broker = StreamsBroker(redis_client, keys, consumer_name="w1")
    broker.declare_queue(QUEUE)
    submit(redis_client, keys, "gone", 1)
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    assert next(consumer) is not None
    redis_client.delete(keys.partition(QUEUE, "gone"))  # an operator's DEL, a lost key: still listed
    for _ in range(3):
        assert next(consumer) is None
    # Made again with its group at the first NOGROUP, so blocking reads block again instead of
    # failing at once in a loop until the next submit happens to make it.
    assert redis_client.xinfo_groups(keys.partition(QUEUE, "gone"))[0]["name"] == CONSUMER_GROUP.encode()
    submit(redis_client, keys, "gone", 1, prefix="again")
    got = [m for m in (next(consumer) for _ in range(3)) if m is not None]
    assert [m.message_id for m in got] == ["again-0"]


def test_the_lua_shard_count_is_the_keys_one() -> None:
    entry = scripts.source(PACKAGE, "entry.lua")
    match = re.search(r"local SHARDS = (\d+)", entry)
    assert match is not None and int(match.group(1)) == PREFIX_SHARDS
