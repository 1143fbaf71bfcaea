"""Jobs waiting in a pool that has no live worker move to the next backend of their route.

Admission already sends new jobs to a live pool; this is for jobs queued before their pool died
(a whole mlx pool killed, a host that never came back). Every worker supervisor runs it, so any
live pool rescues the others' work. A job must have waited `rescue_after_s` first, so a pool
that is only restarting keeps its queue.
"""

from __future__ import annotations

import logging

import dramatiq
import redis

from jobcontract import protocol
from jobcontract.connection import stream_reply
from jobcontract.keys import CONSUMER_GROUP, Keys, QueueRef, parse_queue
from jobcontract.models import Backend
from jobcontract.protocol.entry import QueueEntry
from jobcontract.protocol.liveness import LiveWorkers
from jobcontract.protocol.queue import RescueMove
from jobcontract.routes import Routes

log = logging.getLogger(__name__)


class Rescuer:
    def __init__(self, client: redis.Redis, keys: Keys, routes: Routes, *, name: str, rescue_after_s: float) -> None:
        self.client = client
        self.keys = keys
        self.routes = routes
        self.name = f"rescuer:{name}"
        self.rescue_after_ms = int(rescue_after_s * 1000)

    def run_once(self) -> int:
        """One pass: one call to read the queues and one for every pool's liveness while all pools live
        (a quiet fleet's pass), more only for a pool with nobody left."""
        queues = [q for q in (parse_queue(_text(raw)) for raw in self.client.smembers(self.keys.queues)) if q]
        pools = sorted({(q.model, q.backend) for q in queues}, key=lambda pool: (pool[0], pool[1].value))
        if not pools:
            return 0
        counts: list[int] = protocol.run(self.client, LiveWorkers(self.keys, pools))
        live = dict(zip(pools, counts, strict=True))
        dead = [q for q in queues if not live[(q.model, q.backend)]]
        if not dead:
            return 0
        seconds, micros = self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        moved = 0
        for parts in dead:
            target = self._target(parts)
            if target is not None:
                moved += self._move_waiting(parts, target, now_ms)
        return moved

    def _pool_live(self, model: str, backend: Backend) -> bool:
        return protocol.run(self.client, LiveWorkers(self.keys, [(model, backend)]))[0] > 0

    def _target(self, parts: QueueRef) -> Backend | None:
        try:
            route = self.routes.get(parts.model)
        except KeyError:
            return None
        for backend in route.order:
            if backend is not parts.backend and self._pool_live(parts.model, backend):
                return backend
        return None

    def _move_waiting(self, parts: QueueRef, target: Backend, now_ms: int) -> int:
        """Each partition of the queue (its own stream, each in its partition set) moves to the same one there."""
        source = parts.on(parts.backend)
        partitions: list[str | None] = [
            None,
            *sorted(_text(m) for m in self.client.smembers(self.keys.partitions(source))),
        ]
        return sum(self._move_partition(parts, source, p, target, now_ms) for p in partitions)

    def _move_partition(self, parts: QueueRef, source: str, partition: str | None, target: Backend, now_ms: int) -> int:
        stream = self.keys.partition(source, partition)
        if not self._oldest_waiting_is_older_than(stream, now_ms - self.rescue_after_ms):
            return 0
        # Vouch for the rescuer while it holds entries, so janitors leave them to it; if this process
        # dies mid-move the key expires and they are handed back like any dead consumer's.
        self.client.set(self.keys.alive(self.name), 1, px=10_000)
        reply = stream_reply(self.client.xreadgroup(CONSUMER_GROUP, self.name, {stream: ">"}, count=500))
        destination = parts.on(target)
        moved = 0
        for _stream, entries in reply:
            for entry_id, fields in entries:
                raw = QueueEntry.read(fields).message or b""
                message = dramatiq.Message.decode(raw).copy(queue_name=destination)
                move = RescueMove(
                    self.keys, source, destination, _text(entry_id), message.encode(), partition=partition
                )
                moved += protocol.run(self.client, move)
        if moved:
            log.warning(
                "pool %s has no live worker: moved %d waiting job(s) to %s", parts.backend.value, moved, destination
            )
        self.client.delete(self.keys.alive(self.name))
        return moved

    def _oldest_waiting_is_older_than(self, stream: str, cutoff_ms: int) -> bool:
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:
            return False  # no such stream: nothing waits
        group = next((g for g in groups if _text(g["name"]) == CONSUMER_GROUP), None)
        if group is None:  # jobs were queued for a pool that never started: read them from the start
            try:
                self.client.xgroup_create(stream, CONSUMER_GROUP, id="0")
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            after = "0-0"
        else:
            after = _text(group["last-delivered-id"])
        first = self.client.xrange(stream, min=f"({after}", count=1)
        if not first:
            return False
        entry_ms = int(_text(first[0][0]).split("-")[0])
        return entry_ms <= cutoff_ms


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
