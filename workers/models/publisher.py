"""Publishes what a worker process serves and holds (jobcontract.protocol.placement) when it changes
(a server's state change pokes it) and renews it three times per liveness TTL, for which it holds:
admission, the scheduler, `genq models` and /v1/models read it.

From the worker process itself, not its supervisor (which vouches for liveness): only the process
knows which of its servers run. A process that freezes stops renewing, and its record lapses a
liveness TTL later, as its pool membership does; that only hides its models, never loses a job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.protocol.placement import PublishModels, WithdrawModels, WorkerModels

log = logging.getLogger(__name__)

# An unchanged record is renewed three times per TTL (two renewals may be late before it lapses):
# 0.3 Redis calls a second at the 10 s default. Building the record (metrics, /proc) costs the worker
# as much CPU as the call, so it is not looked at more often: a server that starts, dies or loads
# pokes the publisher, which publishes at once when the record changed.
RENEWALS_PER_TTL = 3


class ModelsPublisher:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        record: Callable[[], WorkerModels],
        *,
        ttl_s: float,
    ) -> None:
        self.client = client
        self.keys = keys
        self.record = record
        self.ttl_ms = int(ttl_s * 1000)
        self.renew_every_s = ttl_s / RENEWALS_PER_TTL
        self._poked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="models-publisher", daemon=True)
        self._worker = ""
        self._published: WorkerModels | None = None
        self._published_at = float("-inf")

    def publish(self) -> None:
        """Publish the record now if it changed since the last publish or is due for renewal."""
        record = self.record()
        if record == self._published and time.monotonic() - self._published_at < self.renew_every_s:
            return
        self._worker = record.worker
        protocol.run(self.client, PublishModels(self.keys, record, self.ttl_ms))
        self._published, self._published_at = record, time.monotonic()

    def poke(self) -> None:
        """Something the record says changed (a server's state): look now, publish if it differs."""
        self._poked.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()
        self._thread.join(timeout=5)
        if self._worker:
            with contextlib.suppress(redis.RedisError):
                protocol.run(self.client, WithdrawModels(self.keys, [self._worker]))

    def _run(self) -> None:
        while True:
            try:
                self.publish()
            except redis.RedisError as error:
                log.warning("could not publish this worker's models (%s); its record lapses meanwhile", error)
            except Exception:
                log.exception("could not build this worker's models record")
            # Until the renewal is due; after a failure (nothing published lately), a renewal's time.
            due_in = self._published_at + self.renew_every_s - time.monotonic()
            self._poked.wait(due_in if due_in > 0 else self.renew_every_s)
            self._poked.clear()
            if self._stop.is_set():
                return
