"""Child processes that die with whoever started them: for the demo, the benchmarks and the tests.

A fixture that fails half-way, a benchmark that raises, a pytest run killed by a CI timeout: none
may leave a `genq worker`, an `mlx_lm.server` or a `redis-server` behind on a shared machine. So
every process started here

- is killed by the kernel when the thread that started it dies, even by SIGKILL (Linux:
  PR_SET_PDEATHSIG; a `genq worker` killed this way takes its worker processes and their servers
  with it, through their own PR_SET_PDEATHSIG);
- is registered, so a caller can stop whatever it started since a point (see `started_since`),
  and whatever is still running when the interpreter exits is stopped (atexit; the only help on
  macOS when the parent is SIGKILLed is the next run's own cleanup, so stop what you start).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1

_lock = threading.Lock()
_serial = itertools.count(1)
_live: dict[int, subprocess.Popen[bytes]] = {}  # by start order: a serial number, not a pid


def _die_with_this_thread() -> Callable[[], None] | None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so it is set only for
    children started from the main thread: one started from a short-lived thread would be killed
    when that thread returns."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_pdeathsig


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str],
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with its output in `log_path` (or discarded), registered and bound to this process."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") if log_path is not None else open(os.devnull, "wb") as out:
        process = subprocess.Popen(
            [os.fspath(a) for a in argv],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_this_thread(),
        )
    with _lock:
        _live[next(_serial)] = process
    return process


def stop(process: subprocess.Popen[bytes], *, timeout_s: float = 60) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; returns the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _forget(process)
    return process.returncode


def mark() -> int:
    """A point in the start order, for `started_since`."""
    with _lock:
        return max(_live, default=0)


def started_since(point: int) -> list[subprocess.Popen[bytes]]:
    """The processes started after `point` that still run, newest first."""
    with _lock:
        for serial, process in list(_live.items()):
            if process.poll() is not None:  # ended on its own
                del _live[serial]
        found = [p for serial, p in _live.items() if serial > point]
    return found[::-1]


def stop_started_since(point: int, *, timeout_s: float = 30) -> int:
    """Stop what was started after `point` and still runs, newest first; how many there were."""
    found = started_since(point)
    for process in found:
        stop(process, timeout_s=timeout_s)
    return len(found)


def _forget(process: subprocess.Popen[bytes]) -> None:
    with _lock:
        for serial, known in list(_live.items()):
            if known is process:
                del _live[serial]


@atexit.register
def _stop_all_left() -> None:
    stop_started_since(0, timeout_s=15)
