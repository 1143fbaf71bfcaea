"""A streamed job's tokens into its event stream, grouped when they come faster than Redis needs them.

One XADD per token was a third of a streamed job's CPU in the worker (bench/results/worker_cpu.md):
servers often emit several tokens within a millisecond or two. So the first token goes out at once
(time to first token as seen by a caller is unchanged), and each later one goes out at once too if
the last XADD is at least `window_s` old; otherwise it waits, with any others that follow, for the
moment the window ends, when one XADD carries them all (JobStore.publish_tokens). A token therefore
reaches a reader at most `window_s` later than it would have, whether or not another follows it:
a process-wide flusher thread sends what is still waiting when its window ends.

The attempt's own timings (first token, gaps between tokens, what the metrics report) are taken
where the tokens are read from the server (workers.backend_client), not here: grouping changes
only how they travel to readers.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable

WINDOW_S = 0.005

Publish = Callable[[int, list[str]], None]


class TokenBatch:
    """One attempt's tokens; `add` for each as it arrives, `close` when the attempt ends (it sends
    what waits). Publishing happens under the batch's lock, so its XADDs keep the tokens' order."""

    def __init__(self, publish: Publish, *, window_s: float = WINDOW_S) -> None:
        self._publish = publish
        self.window_s = window_s
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._first = 0
        self._sent_at = -math.inf

    def add(self, index: int, text: str) -> None:
        with self._lock:
            if not self._pending:
                self._first = index
            self._pending.append(text)
            due = self._sent_at + self.window_s
            if time.monotonic() >= due:
                self._send()
            elif len(self._pending) == 1:
                FLUSHER.at(due, self.flush)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._send()

    close = flush

    def __enter__(self) -> TokenBatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self) -> None:
        self._publish(self._first, self._pending)  # if this raises, they wait for the next add or close
        self._pending = []
        self._sent_at = time.monotonic()


class Flusher:
    """One thread per process that calls each scheduled flush at its time; idle (no wake-ups) when
    nothing waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def at(self, when: float, flush: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._order), flush))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="token-flusher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, flush = heapq.heappop(self._heap)
            with contextlib.suppress(Exception):  # still pending: the next add or the close sends them
                flush()


FLUSHER = Flusher()
