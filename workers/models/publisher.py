"""Publishes what a worker process serves and holds (jobcontract.protocol.placement) about every
second, held for the liveness TTL: admission, the scheduler, `genq models` and /v1/models read it.

From the worker process itself, not its supervisor (which vouches for liveness): only the process
knows which of its servers run. A process that freezes stops renewing, and its record lapses a
liveness TTL later, as its pool membership does; that only hides its models, never loses a job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import redis

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.protocol.placement import PublishModels, WithdrawModels, WorkerModels

log = logging.getLogger(__name__)

# Like the supervisor's vouching (a quarter of the 10 s liveness TTL): what a worker holds shows in
# admission, `genq models` and other workers' plans within 2.5 s, for 0.4 Redis calls a second.
PUBLISH_EVERY_S = 2.5


class ModelsPublisher:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        record: Callable[[], WorkerModels],
        *,
        ttl_s: float,
        every_s: float = PUBLISH_EVERY_S,
    ) -> None:
        self.client = client
        self.keys = keys
        self.record = record
        self.ttl_ms = int(ttl_s * 1000)
        self.every_s = min(every_s, ttl_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="models-publisher", daemon=True)
        self._worker = ""

    def publish(self) -> None:
        record = self.record()
        self._worker = record.worker
        protocol.run(self.client, PublishModels(self.keys, record, self.ttl_ms))

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
            if self._stop.wait(self.every_s):
                return
