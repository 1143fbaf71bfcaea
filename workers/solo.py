"""Run a suspect job alone on its server.

When a server dies mid-answer, every job it was serving fails the same way and only one of them
(if any) was the cause. Each is retried alone: the innocent ones finish, and a job the server dies
under while alone (twice: once is no proof) is held to be poison instead of taking the pool down
again and again. A readers-writer gate: normal jobs share the server, a suspect waits for it to be
empty and keeps new jobs out while it runs.

Waiting here is part of a job's attempt: the wait ends early when the job's deadline passes or it is
cancelled, so neither is ignored while suspects take their turns after a crash.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

# How often a waiter looks at its cancel flag: a cancel is an Event the gate's condition cannot see.
POLL_S = 0.05


class GateClosed(Exception):
    """The wait at the gate ended without entering: the deadline passed, or the job was cancelled."""

    def __init__(self, *, cancelled: bool) -> None:
        super().__init__("cancelled while waiting" if cancelled else "deadline passed while waiting")
        self.cancelled = cancelled


class SoloGate:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._solo = False
        self._solo_waiting = 0

    @contextlib.contextmanager
    def enter(
        self, *, solo: bool, deadline: float | None = None, cancelled: threading.Event | None = None
    ) -> Iterator[None]:
        """Enter (alone if `solo`); GateClosed if `deadline` (monotonic) passes or `cancelled` is set first."""
        with self._condition:
            if solo:
                self._solo_waiting += 1
                try:
                    self._wait(lambda: not self._solo and self._shared == 0, deadline, cancelled)
                finally:
                    self._solo_waiting -= 1
                    self._condition.notify_all()  # shared waiters held back by this suspect may go
                self._solo = True
            else:
                self._wait(lambda: not self._solo and self._solo_waiting == 0, deadline, cancelled)
                self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                if solo:
                    self._solo = False
                else:
                    self._shared -= 1
                self._condition.notify_all()

    def _wait(self, free: Callable[[], bool], deadline: float | None, cancelled: threading.Event | None) -> None:
        while not free():
            if cancelled is not None and cancelled.is_set():
                raise GateClosed(cancelled=True)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GateClosed(cancelled=False)
            timeout = POLL_S if cancelled is not None else left
            self._condition.wait(timeout if left is None or timeout is None else min(timeout, left))
