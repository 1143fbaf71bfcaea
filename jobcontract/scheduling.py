"""Which work a worker takes next: one scheduler for tenants' fair share, model placement and priority.

Every rule about the order of work is decided in one of two places, each with one job:
- `plan()` here, pure and free of I/O, says where a consumer may take from and on what terms (its
  tiers): the queue it serves, and an age bound for a queue whose model this worker would first have
  to load while another live worker has it loaded already (so a swap happens only when it pays, and
  nothing waits forever: past the bound anyone takes it).
- `jobcontract/protocol/take.lua` (the Take operation) takes the entries, atomically, in Redis: the
  tiers in order, and within a tier the tenants' lanes in turn by start-time fair queueing weighted
  by each tenant's share, with one account per queue that all workers of the pool share.

Interactive work goes before batch work as before: each lane of a pool (interactive, batch) is its own
queue with its own consumer, and a worker's threads run prefetched interactive messages first
(workers.process.LANE_PRIORITY). Fair share orders tenants within a queue; it never lets a tenant's
batch line pass anyone's interactive request.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_SWAP_WAIT_S = 30.0


@dataclass(frozen=True)
class Tier:
    """One queue to take from; with `min_age_ms`, only entries that waited at least that long."""

    queue: str
    min_age_ms: int = 0


@dataclass(frozen=True)
class TakePlan:
    """Tiers in order: a later one is read only for the room the earlier ones left."""

    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class Placement:
    """What a worker knows of a queue's model when it plans a read: whether it has the model loaded,
    and whether some other live worker of the pool does."""

    loaded_here: bool = True
    loaded_elsewhere: bool = False
    max_swap_wait_s: float = DEFAULT_MAX_SWAP_WAIT_S


def plan(queue: str, placement: Placement = Placement()) -> TakePlan:
    """A worker that has the queue's model loaded, or one that would load it when nobody has, takes
    at once; one that would load it while another worker has it loaded takes only what waited past
    the swap bound (that worker could not start it in time)."""
    if placement.loaded_here or not placement.loaded_elsewhere:
        return TakePlan((Tier(queue),))
    return TakePlan((Tier(queue, min_age_ms=int(placement.max_swap_wait_s * 1000)),))
