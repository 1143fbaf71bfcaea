"""Which work a worker takes next: one scheduler for tenants' fair share, model placement, prompt-prefix
placement and priority.

Every rule about the order of work is decided in one of two places, each with one job:
- `plan()` here, pure and free of I/O, says where a consumer may take from and on what terms (its
  tiers): the queue it serves, which of the queue's partitions (its own prefix shards first, the shards
  other workers own only for the room left and once their jobs waited `steal_after_s`), and an age
  bound for a queue whose model this worker would first have to load while another live worker has
  it loaded, or while its own loaded models have work (so a swap happens only when it pays, jobs of
  one model are grouped while they last, and nothing waits for ever: past the bound anyone takes it).
- `jobcontract/protocol/take.lua` (the Take operation) takes the entries, atomically, in Redis: the
  tiers in order, the owner of each prefix shard by rendezvous hashing over the pool's live workers,
  and within a tier the tenants' partitions in turn by start-time fair queueing weighted by each tenant's
  share, with one account per queue that all workers of the pool share.

A queue's partitions (jobcontract.keys.partition_of): the queue's own stream, and one stream per tenant,
or per tenant and prefix shard for jobs with a prefix fingerprint (jobcontract.prefix). Interactive
work goes before batch work as before: each lane of a pool (interactive, batch) is its own queue with
its own consumer, and a worker's threads run prefetched interactive messages first
(workers.process.LANE_PRIORITY). Fair share and placement order work within a queue; they never let
anyone's batch line pass an interactive request.

Why prefix placement is work-conserving: a worker reads the shards it owns first; only the room they
leave goes to other owners' shards, and only to jobs that waited `steal_after_s` (the owner, blocked
on its partitions, takes a new job at once when it has a free slot; a job still waiting after that has an
owner with no room). So an idle worker never sits idle while jobs wait, a hot prefix spills to other
workers when its owner is saturated, and a dead worker's shards belong to the live ones the moment
its vouch lapses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jobcontract.keys import partition_of
from jobcontract.prefix import prefix_of

DEFAULT_MAX_SWAP_WAIT_S = 30.0
DEFAULT_STEAL_AFTER_S = 0.25


class Select(StrEnum):
    """Which partitions of a queue a tier reads."""

    ALL = "all"
    MINE = "mine"  # partitions without a prefix shard, and the shards this worker owns
    THEIRS = "theirs"  # the shards other live workers of the pool own


@dataclass(frozen=True)
class Tier:
    """One queue's partitions to take from; with `min_age_ms`, only entries that waited at least that long."""

    queue: str
    min_age_ms: int = 0
    select: Select = Select.ALL


@dataclass(frozen=True)
class TakePlan:
    """Tiers in order: a later one is read only for the room the earlier ones left."""

    tiers: tuple[Tier, ...]
    block: bool = True  # may the consumer block in XREADGROUP (which takes whatever comes) when idle
    # May an idle consumer wait long in one read (jobcontract.consumer.IDLE_BLOCK_MS): not while what
    # it should read can change without a new partition (a multi-model worker's loads and swaps).
    may_idle: bool = True


@dataclass(frozen=True)
class Placement:
    """What a worker knows when it plans a read of a queue: whether it has the queue's model loaded,
    whether some other live worker of the pool does, and whether it places by prompt prefix."""

    loaded_here: bool = True
    loaded_elsewhere: bool = False
    busy_here: bool = False  # the swap would unload models with work here (jobs held, running or waiting)
    swap_after_s: float = 0.0  # else: how long its jobs should have waited first (the idle models' reload)
    swap_needed: bool = True  # loading the queue's model here would unload another
    committed_here: bool = False  # not loaded, but this worker holds jobs for it: they wait for its load
    since_turn_s: float = 0.0  # how long the model has gone without serving a job on this worker
    may_block: bool = True  # False while the model is not loaded here: a blocking read bypasses the plan
    may_idle: bool = True  # False when loads can change the plan (several models): see TakePlan.may_idle
    max_swap_wait_s: float = DEFAULT_MAX_SWAP_WAIT_S
    prefix_affinity: bool = True
    steal_after_s: float = DEFAULT_STEAL_AFTER_S


def plan(queue: str, placement: Placement = Placement()) -> TakePlan:
    """Several models on a worker: jobs of one model are grouped while they last, and a swap happens
    when it pays, within a bound, so nothing starves (A A A B B C, not A B A C).

    A worker takes at once for a model it has loaded (its own prefix shards first), or one that fits
    beside what it holds; when the models it would unload for it are idle, the jobs that waited
    `swap_after_s` (what reloading those models would cost, less their idle time). For a model
    it would have to swap in while the models in the way have work, it takes only jobs that waited
    `max_swap_wait_s`, and only once the model has gone that long without a turn here: both bounds,
    since a job's age alone lets a backlog (old at once) swap back the moment it was swapped out,
    and a turn's length alone is reset by every moment the worker has nothing to do, so in a steady
    stream a model would wait for ever. While another live worker has the model loaded, it takes
    only jobs that waited the bound there (that worker could not start them in time). Once it holds
    jobs for a model it has not loaded yet, it takes no more until the load: they are enough to
    start it."""
    if placement.committed_here and not placement.loaded_here:
        return TakePlan((), block=False)
    must_swap = not placement.loaded_here and placement.swap_needed
    if must_swap and placement.busy_here and placement.since_turn_s < placement.max_swap_wait_s:
        return TakePlan((), block=False)  # not its turn yet
    held_back = must_swap and (placement.busy_here or placement.loaded_elsewhere)
    swap_ms = _ms(placement.max_swap_wait_s) if held_back else _ms(placement.swap_after_s) if must_swap else 0
    if not placement.prefix_affinity:
        return TakePlan((Tier(queue, swap_ms),), block=placement.may_block, may_idle=placement.may_idle)
    steal_ms = max(swap_ms, _ms(placement.steal_after_s))
    tiers = (Tier(queue, swap_ms, Select.MINE), Tier(queue, steal_ms, Select.THEIRS))
    return TakePlan(tiers, block=placement.may_block, may_idle=placement.may_idle)


def message_partition(kwargs: dict[str, Any], options: dict[str, Any]) -> str | None:
    """The partition a job's message waits in (Keys.partition): its tenant's, in its prefix shard."""
    tenant = kwargs.get("tenant")
    return partition_of(tenant if isinstance(tenant, str) else None, prefix_of(options))


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))
