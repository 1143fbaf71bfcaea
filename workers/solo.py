"""Run a suspect job alone on its server.

When a server dies mid-answer, every job it was serving fails the same way and only one of them
(if any) was the cause. Each is retried once alone: the innocent ones finish, and a job that
kills the server while alone is known to be poison and goes to dead letters instead of taking
the pool down again and again. A readers-writer gate: normal jobs share the server, a suspect
waits for it to be empty and keeps new jobs out while it runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class SoloGate:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._solo = False
        self._solo_waiting = 0

    @contextlib.contextmanager
    def enter(self, *, solo: bool) -> Iterator[None]:
        with self._condition:
            if solo:
                self._solo_waiting += 1
                self._condition.wait_for(lambda: not self._solo and self._shared == 0)
                self._solo_waiting -= 1
                self._solo = True
            else:
                self._condition.wait_for(lambda: not self._solo and self._solo_waiting == 0)
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
