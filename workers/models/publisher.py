"""Publishes what a worker process serves and holds (jobcontract.protocol.placement) when it changes
(looked at every second, with no Redis call) and renews it three times per liveness TTL, for which it
holds: admission, the scheduler, `genq models` and /v1/models read it.

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

# What a worker holds is looked at this often (no Redis): a load or an unload shows in admission,
# `genq models` and other workers' plans within a second.
LOOK_EVERY_S = 1.0
# An unchanged record is renewed three times per TTL (two renewals may be late before it lapses):
# 0.3 Redis calls a second at the 10 s default, an idle worker's share of its Redis load.
RENEWALS_PER_TTL = 3


class ModelsPublisher:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        record: Callable[[], WorkerModels],
        *,
        ttl_s: float,
        look_every_s: float = LOOK_EVERY_S,
    ) -> None:
        self.client = client
        self.keys = keys
        self.record = record
        self.ttl_ms = int(ttl_s * 1000)
        self.renew_every_s = ttl_s / RENEWALS_PER_TTL
        self.look_every_s = min(look_every_s, self.renew_every_s)
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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
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
            if self._stop.wait(self.look_every_s):
                return
