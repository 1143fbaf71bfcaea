"""Real genq workers for tests: `genq worker` subprocesses on the tests' own Redis, found and
killed through their real process ids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings

SERVER_MARKERS = ("mlx_lm.server", "llama_cpp.server", "llama-server")


@dataclass
class WorkerHandle:
    process: subprocess.Popen[bytes]
    settings: GenqSettings
    backend: Backend
    processes: int
    log_path: Path
    model: str = "tiny"
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pool_members(self) -> int:
        client = redis.Redis.from_url(self.settings.redis_url)
        key = Keys(self.settings.namespace).pool(pool_name(self.model, self.backend))
        try:
            return int(client.zcount(key, "-inf", "+inf"))
        finally:
            client.close()

    def wait_ready(self, processes: int | None = None, timeout: float = 120) -> None:
        wanted = processes or self.processes
        deadline = time.monotonic() + timeout
        while self.pool_members() < wanted or len(self.server_pids()) < wanted:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the supervisor), not the servers."""
        try:
            return [
                p.pid
                for p in psutil.Process(self.pid).children()
                if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())
            ]
        except psutil.NoSuchProcess:
            return []

    def server_pids(self) -> list[int]:
        pids = []
        for worker in self.worker_pids():
            try:
                for child in psutil.Process(worker).children():
                    if any(m in " ".join(child.cmdline()) for m in SERVER_MARKERS):
                        pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.stopped:
            return self.process.returncode or 0
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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
    log_path = log_dir / f"worker-{backend}-{time.monotonic_ns()}.log"
    full_env = {
        **os.environ,
        "GENQ_REDIS_URL": settings.redis_url,
        "GENQ_NAMESPACE": settings.namespace,
        "GENQ_MODELS_DIR": str(settings.models_dir),
        "GENQ_LOG_DIR": str(log_dir / "servers"),
        "GENQ_SHUTDOWN_GRACE_S": "10",
        **({"GENQ_ROUTES_FILE": str(settings.routes_file)} if settings.routes_file else {}),
        **(env or {}),
    }
    argv = [
        sys.executable,
        "-m",
        "genq",
        "worker",
        "--model",
        "tiny",
        "--backend",
        backend,
        "--processes",
        str(processes),
        "--concurrency",
        str(concurrency),
        *(extra_args or []),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    handle = WorkerHandle(
        process=process, settings=settings, backend=Backend(backend), processes=processes, log_path=log_path
    )
    if wait:
        handle.wait_ready()
    return handle


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
