"""Reading a queue the way the broker does: its own stream and every partition in its partition set
(jobcontract.keys.partition_of: a tenant's, or a tenant's prefix shard), for tests that count or read
what waits in a queue whatever partition the admission chose."""

from __future__ import annotations

from typing import Any

import redis

from jobcontract.keys import Keys


def partition_streams(client: redis.Redis, keys: Keys, queue: str) -> list[str]:
    members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(keys.partitions(queue)))
    return [keys.stream(queue), *(keys.partition(queue, m) for m in members)]


def queued(client: redis.Redis, keys: Keys, queue: str) -> int:
    """Entries in the queue (waiting or delivered and not yet settled), over all its partitions."""
    return sum(int(client.xlen(stream)) for stream in partition_streams(client, keys, queue))


def entries(client: redis.Redis, keys: Keys, queue: str) -> list[tuple[Any, Any]]:
    """Every entry of the queue, over all its partitions, oldest first."""
    found: list[tuple[Any, Any]] = []
    for stream in partition_streams(client, keys, queue):
        found += list(client.xrange(stream))  # type: ignore[arg-type]
    return sorted(
        found, key=lambda e: tuple(int(p) for p in (e[0].decode() if isinstance(e[0], bytes) else e[0]).split("-"))
    )


def stream_of(client: redis.Redis, keys: Keys, queue: str, job_id: str) -> str:
    """The partition stream of a queue that holds the job's entry (its tenant's, in its prefix shard)."""
    for stream in partition_streams(client, keys, queue):
        for _id, fields in client.xrange(stream):  # type: ignore[union-attr]
            if job_id.encode() in fields.get(b"m", b""):
                return stream
    raise AssertionError(f"no entry of job {job_id} in any partition of {queue}")
