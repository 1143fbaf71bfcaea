"""Real genq workers for tests: `genq worker` subprocesses on the tests' own Redis, started through
genq/local_worker.py (so they die with the test run, even a SIGKILLed one) and found and killed
through their real process ids."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from genq.local_worker import SERVER_MARKERS
from genq.local_worker import Worker as WorkerHandle
from genq.local_worker import start_worker as _start_worker
from jobcontract.settings import GenqSettings

__all__ = ["SERVER_MARKERS", "WorkerHandle", "alive", "start_worker", "wait_until"]


def start_worker(
    settings: GenqSettings,
    log_dir: Path,
    *,
    backend: str = "mlx",
    processes: int = 1,
    concurrency: int = 8,
    env: dict[str, str] | None = None,
    wait: bool = True,
    extra_args: list[str] | None = None,
) -> WorkerHandle:
    return _start_worker(
        settings,
        log_dir,
        backend=backend,
        processes=processes,
        concurrency=concurrency,
        shutdown_grace_s=10,
        env=env,
        extra_args=extra_args or (),
        wait=wait,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = 30, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
