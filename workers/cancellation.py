"""Cancel requests for running jobs reach the worker running them through Redis pub/sub.

A cancel that arrives while the job is still queued never needs this: the job's record says so
and the worker skips it at start. This only aborts jobs already talking to a server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import redis

log = logging.getLogger(__name__)

# How long one look for a cancel waits: a message wakes it at once, so this only bounds how late a
# stopped watch notices (its thread is a daemon nobody joins); each look costs the worker CPU.
LISTEN_S = 5.0


class CancelWatch:
    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cancel-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._events[job_id] = event
        try:
            yield event
        finally:
            with self._lock:
                self._events.pop(job_id, None)

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=LISTEN_S)
                    if message is None:
                        continue
                    job_id = message["data"].decode() if isinstance(message["data"], bytes) else message["data"]
                    with self._lock:
                        event = self._events.get(job_id)
                    if event is not None:
                        event.set()
            except redis.RedisError as error:
                log.warning("cancel channel lost (%s); resubscribing", error)
                self._stopping.wait(0.5)
