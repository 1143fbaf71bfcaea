"""A circuit breaker per pool, shared by every worker and caller through Redis.

After `threshold` retryable failures in a row the pool's circuit opens for `cool_down_s`:
callers admit new jobs to the next backend and workers reroute instead of retrying here, so no
job waits out a timeout on a backend known to be failing. When the key expires the next job
probes the pool again; a success clears the count, another failure streak reopens it.

A success costs nothing unless this breaker has seen trouble on that pool (a failure it recorded,
or the circuit found open): clearing on every success was a Redis round trip per job for a streak
that almost never exists. A streak begun by other workers is then ended by their own success or
by its expiry (3 x cool-down), not by a success here.
"""

from __future__ import annotations

import contextlib

import redis

from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.outage import OUTAGE_ERRORS


class CircuitBreaker:
    def __init__(
        self, client: redis.Redis, keys: Keys, model: str, *, threshold: int = 3, cool_down_s: float = 10.0
    ) -> None:
        self.client = client
        self.keys = keys
        self.model = model
        self.threshold = threshold
        self.cool_down_ms = int(cool_down_s * 1000)
        self._troubled: set[Backend] = set()  # pools with a streak or open circuit this breaker knows of

    def _key(self, backend: Backend) -> str:
        return self.keys.circuit(pool_name(self.model, backend))

    def is_open(self, backend: Backend) -> bool:
        """Best effort: with Redis away the circuit reads closed, so a job's next step (which waits
        out the outage) is not lost to an error here."""
        try:
            opened = bool(self.client.exists(self._key(backend)))
        except OUTAGE_ERRORS:
            return False
        if opened:
            self._troubled.add(backend)
        return opened

    def record_failure(self, backend: Backend) -> bool:
        """Count a failure; returns True when this one opened the circuit. Best effort, like is_open."""
        self._troubled.add(backend)
        try:
            return self._record_failure(backend)
        except OUTAGE_ERRORS:
            return False

    def _record_failure(self, backend: Backend) -> bool:
        streak = self._key(backend) + ":streak"
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(streak)
        pipe.pexpire(streak, self.cool_down_ms * 3)
        count = int(pipe.execute()[0])
        if count >= self.threshold:
            opened = self.client.set(self._key(backend), count, px=self.cool_down_ms, nx=True)
            self.client.delete(streak)
            return bool(opened)
        return False

    def record_success(self, backend: Backend) -> None:
        """A success ends the failure streak and closes the circuit: the pool has recovered. Only
        when this breaker knows of trouble there; otherwise there is nothing to end."""
        if backend in self._troubled:
            self.close(backend)

    def close(self, backend: Backend) -> None:
        """End any failure streak and close the circuit, whoever opened it."""
        with contextlib.suppress(*OUTAGE_ERRORS):
            self.client.delete(self._key(backend) + ":streak", self._key(backend))
            self._troubled.discard(backend)
