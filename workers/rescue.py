"""Jobs waiting in a pool that has no live worker move to the next backend of their route.

Admission already sends new jobs to a live pool; this is for jobs queued before their pool died
(a whole mlx pool killed, a host that never came back). Every worker supervisor runs it, so any
live pool rescues the others' work. A job must have waited `rescue_after_s` first, so a pool
that is only restarting keeps its queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dramatiq
import redis
from dramatiq.common import dq_name

from jobcontract.connection import stream_reply
from jobcontract.keys import CONSUMER_GROUP, Keys, pool_name, queue_name
from jobcontract.models import Backend, Lane
from jobcontract.routes import Routes

log = logging.getLogger(__name__)

# Moves one entry only if it is still pending to the rescuer (a janitor may have taken it back).
MOVE_SCRIPT = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[3], 'r', '0')
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

DELAY_SUFFIX = ".DQ"


@dataclass(frozen=True)
class QueueParts:
    model: str
    backend: Backend
    lane: Lane
    delayed: bool

    @classmethod
    def parse(cls, name: str) -> QueueParts | None:
        """`{model}.{backend}.{lane}[.DQ]`, read from the right: model names may hold dots."""
        delayed = name.endswith(DELAY_SUFFIX)
        base = name.removesuffix(DELAY_SUFFIX)
        parts = base.rsplit(".", 2)
        if len(parts) != 3:
            return None
        try:
            return cls(parts[0], Backend(parts[1]), Lane(parts[2]), delayed)
        except ValueError:
            return None

    def on(self, backend: Backend) -> str:
        name = queue_name(self.model, backend, self.lane)
        return dq_name(name) if self.delayed else name


class Rescuer:
    def __init__(self, client: redis.Redis, keys: Keys, routes: Routes, *, name: str, rescue_after_s: float) -> None:
        self.client = client
        self.keys = keys
        self.routes = routes
        self.name = f"rescuer:{name}"
        self.rescue_after_ms = int(rescue_after_s * 1000)
        self._move = client.register_script(MOVE_SCRIPT)

    def run_once(self) -> int:
        seconds, micros = self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        moved = 0
        for raw in self.client.smembers(self.keys.queues):
            parts = QueueParts.parse(raw.decode() if isinstance(raw, bytes) else str(raw))
            if parts is None or self._pool_live(parts.model, parts.backend, now_ms):
                continue
            target = self._target(parts, now_ms)
            if target is not None:
                moved += self._move_waiting(parts, target, now_ms)
        return moved

    def _pool_live(self, model: str, backend: Backend, now_ms: int) -> bool:
        return int(self.client.zcount(self.keys.pool(pool_name(model, backend)), now_ms * 1000, "+inf")) > 0

    def _target(self, parts: QueueParts, now_ms: int) -> Backend | None:
        try:
            route = self.routes.get(parts.model)
        except KeyError:
            return None
        for backend in route.order:
            if backend is not parts.backend and self._pool_live(parts.model, backend, now_ms):
                return backend
        return None

    def _move_waiting(self, parts: QueueParts, target: Backend, now_ms: int) -> int:
        source = parts.on(parts.backend)
        stream = self.keys.stream(source)
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
                message = dramatiq.Message.decode(fields[b"m"]).copy(queue_name=destination)
                moved += int(
                    self._move(
                        keys=[stream, self.keys.stream(destination)], args=[CONSUMER_GROUP, entry_id, message.encode()]
                    )
                )
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
