"""Writes that must outlive a failover: admissions and results wait for a replica's acknowledgement.

Redis replicates asynchronously: a write the master acknowledged can be missing on the replica
Sentinel promotes. For most keys that costs nothing (liveness, tokens, metrics come back), but a
job reported queued and then gone would be lost silently, and a result gone means the job runs
again. So, when asked (`min_replicas` / `wait_ms` in the Redis URL, or GENQ_REDIS_MIN_REPLICAS /
GENQ_REDIS_WAIT_MS; on by default with Sentinel), admission and finish end with `WAIT`, sent in
the same pipeline as the write: WAIT only covers writes made on its own connection, and a pool
hands different threads different connections.

When WAIT comes back short while a replica is connected (lagging, cut off, frozen): an admission
raises NotReplicated (the caller is told its job may not survive a failover, and its ids, instead
of "queued"); a finish is logged and kept (the result is on the master; if it is lost, the job's
entry, still pending in the same lost window, runs again). When the master has no replica at all
(just after a failover, before the old master is back as a replica) nothing can be promoted over
it: writes go on unconfirmed, as on a single Redis, rather than stopping genq.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from jobcontract.sentinel import DURABILITY_OPTIONS, is_sentinel_url

log = logging.getLogger(__name__)

_ATTRIBUTE = "genq_durability"
_WATCH = "genq_replica_watch"


@dataclass(frozen=True)
class Durability:
    min_replicas: int = 0
    wait_ms: int = 500

    @property
    def waits(self) -> bool:
        return self.min_replicas > 0


NO_WAIT = Durability()


class NotReplicated(Exception):
    """Admitted on the master, but no replica confirmed it in time: a failover now could lose it.
    Retryable: resubmit with the same idempotency key (the store answers with the first job if it
    survived), or look the ids up with status()."""

    def __init__(self, job_ids: list[str], durability: Durability, acked: int) -> None:
        super().__init__(
            f"{len(job_ids)} job(s) admitted but confirmed by {acked} of {durability.min_replicas} replica(s) "
            f"within {durability.wait_ms} ms, so they may not survive a Redis failover; resubmit with the "
            f"same idempotency key or check their status: {', '.join(job_ids[:5])}{' ...' if len(job_ids) > 5 else ''}"
        )
        self.job_ids = job_ids
        self.retry_after_s = 1.0


def split_url(url: str) -> tuple[str, Durability]:
    """The URL without genq's own options (redis-py refuses unknown ones), and what they ask."""
    head, mark, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True) if mark else []
    ours = {k: v for k, v in pairs if k in DURABILITY_OPTIONS}
    rest = "&".join(p for p in query.split("&") if p.partition("=")[0] not in DURABILITY_OPTIONS) if mark else ""
    default_replicas = 1 if is_sentinel_url(url) else 0
    durability = Durability(
        min_replicas=int(ours.get("min_replicas", default_replicas)),
        wait_ms=int(ours.get("wait_ms", Durability.wait_ms)),
    )
    if durability.min_replicas < 0 or durability.wait_ms <= 0:
        raise ValueError("min_replicas must be >= 0 and wait_ms > 0")
    return head + ("?" + rest if rest else ""), durability


def attach(client: Any, durability: Durability) -> Any:
    setattr(client, _ATTRIBUTE, durability)
    return client


def durability_of(client: Any) -> Durability:
    found = getattr(client, _ATTRIBUTE, NO_WAIT)
    return found if isinstance(found, Durability) else NO_WAIT


def add_wait(pipe: Any, client: Any) -> Durability:
    """Queue WAIT (then ROLE, to tell a lagging replica from none at all) behind the pipeline's
    writes when the client asks for it and the master was not just seen alone."""
    durability = durability_of(client)
    if not durability.waits or time.monotonic() < _watch(client).alone_until:
        return NO_WAIT
    pipe.execute_command("WAIT", durability.min_replicas, durability.wait_ms)
    pipe.execute_command("ROLE")
    return durability


def admitted(replies: list[Any], durability: Durability, client: Any) -> Any:
    """The admission script's reply (a row per request) without WAIT's; NotReplicated when a newly
    queued job was not confirmed."""
    replies, acked = _confirmed(replies, durability, client)
    rows = replies[0]
    if acked is not None:
        fresh = [_text(row[1]) for row in rows if _text(row[0]) == "queued"]
        if fresh:
            raise NotReplicated(fresh, durability, acked)
    return rows


def finished(replies: list[Any], durability: Durability, client: Any, job_id: str) -> list[Any]:
    """The finish replies without WAIT's; a short WAIT is logged, never fatal to the result."""
    replies, acked = _confirmed(replies, durability, client)
    if acked is not None:
        log.warning(
            "result of job %s confirmed by %d of %d replica(s) within %d ms: a failover now would run it again",
            job_id,
            acked,
            durability.min_replicas,
            durability.wait_ms,
        )
    return replies


# A master seen without any replica is not waited on for this long, then asked again.
ALONE_RECHECK_S = 1.0


@dataclass
class _Watch:
    alone_until: float = 0.0  # monotonic


def _watch(client: Any) -> _Watch:
    found = getattr(client, _WATCH, None)
    if not isinstance(found, _Watch):
        found = _Watch()
        setattr(client, _WATCH, found)
    return found


def _confirmed(replies: list[Any], durability: Durability, client: Any) -> tuple[list[Any], int | None]:
    """Strip WAIT's and ROLE's replies; the replicas that confirmed when too few did, else None.

    A master with no replica connected at all is not short of confirmations: no failover can lose
    its writes (Sentinel promotes replicas only), its own persistence is all there is, as without
    Sentinel. Refusing work then would stop genq until a replica is back, so it goes on, says so,
    and stops waiting for ALONE_RECHECK_S."""
    if not durability.waits:
        return replies, None
    acked, role, replies = int(replies[-2]), replies[-1], replies[:-2]
    if acked >= durability.min_replicas:
        return replies, None
    connected = len(role[2]) if role and _text(role[0]) == "master" and len(role) > 2 else 0
    if connected == 0:
        _watch(client).alone_until = time.monotonic() + ALONE_RECHECK_S
        log.warning("the Redis master has no replica: admissions and results go on unconfirmed until one is back")
        return replies, None
    return replies, acked


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
