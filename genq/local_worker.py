"""A real `genq worker` subprocess started from Python, and what its starter can ask of it: is every
process in its pool, which servers run under it, how much memory it all takes, and stop it for sure.

Kept apart from the stack (genq/local_stack.py) because the tests start workers on a Redis of their
own fixtures: they need the handle without the private Redis and the tiny model around it. The
worker dies with its starter even when that is SIGKILLed (genq/processes.py), and its environment
follows the one rule of genq/worker_env.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from genq import processes as procs
from genq.worker_env import worker_env
from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings

# How a server process is told from its command line (workers.servers.specs starts mlx_lm.server through
# workers.servers.mlx_server).
SERVER_MARKERS = ("workers.servers.mlx_server", "mlx_lm.server", "llama_cpp.server", "llama-server")
MODEL = "tiny"
# "<date> <time> <consumer> INFO workers.process: serving ...": a worker process is ready.
_SERVING = re.compile(r"^\S+ \S+ (?P<consumer>\S+) INFO workers\.process: serving ")


@dataclass
class Worker:
    """A real `genq worker` subprocess: the supervisor, its worker processes and their servers."""

    process: subprocess.Popen[bytes]
    settings: GenqSettings
    backend: Backend
    processes: int
    log_path: Path
    launched: float = field(default_factory=time.monotonic)
    model: str = MODEL
    stopped: bool = False
    ready_timeout: float = 120
    poll_interval: float = 0.05  # a benchmark timing the start polls finer

    @property
    def pid(self) -> int:
        return self.process.pid

    def pool_members(self, client: redis.Redis | None = None) -> int:
        own = client or redis.Redis.from_url(self.settings.redis_url)
        try:
            key = Keys(self.settings.namespace).pool(pool_name(self.model, self.backend))
            return int(own.zcount(key, "-inf", "+inf"))
        finally:
            if client is None:
                own.close()

    def joined(self, client: redis.Redis) -> int:
        """How many of this worker's own processes are in its pool: those that said they serve (the
        log line workers.process writes once ready) and that the pool holds. Not the pool's size: a
        second worker in the same pool would count the first's processes as its own."""
        key = Keys(self.settings.namespace).pool(pool_name(self.model, self.backend))
        names = {
            m["consumer"] for m in map(_SERVING.match, self.log_path.read_text(errors="replace").splitlines()) if m
        }
        return sum(1 for name in names if client.zscore(key, name) is not None)

    def wait_ready(
        self,
        processes: int | None = None,
        timeout: float | None = None,
        *,
        servers: bool = True,
        interval: float | None = None,
    ) -> float:
        """Block until every process has joined its pool (and, with `servers`, its server runs);
        returns seconds since launch. Polls gently: on 2 cores a busy poller slows the start."""
        wanted = processes or self.processes
        timeout = self.ready_timeout if timeout is None else timeout
        interval = self.poll_interval if interval is None else interval
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            while self.joined(client) < wanted or (servers and len(self.server_pids()) < wanted):
                if self.process.poll() is not None:
                    raise RuntimeError(f"genq worker exited with {self.process.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"genq worker not ready after {timeout:.0f}s:\n{self.log()}")
                time.sleep(interval)
        finally:
            client.close()
        return time.monotonic() - self.launched

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the supervisor), not the servers."""
        import psutil

        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                    pids.append(child.pid)
        return pids

    def server_pids(self) -> list[int]:
        import psutil

        pids = []
        for worker in self.worker_pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(worker).children():
                    if child.status() != psutil.STATUS_ZOMBIE and any(
                        m in " ".join(child.cmdline()) for m in SERVER_MARKERS
                    ):
                        pids.append(child.pid)
        return pids

    def server_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in map(port_of, self.server_pids()) if port]

    def memory_mb(self) -> dict[str, float]:
        """RSS of genq's own processes (supervisor, workers and helpers) and of the servers beside them."""
        import psutil

        servers = self.server_pids()
        try:
            tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return {"genq_mb": 0.0, "servers_mb": 0.0}
        own = sum(rss_mb(p.pid) for p in tree if p.pid not in servers)
        return {"genq_mb": own, "servers_mb": sum(rss_mb(p) for p in servers)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (after waking any server a test or benchmark froze), SIGKILL after `timeout`."""
        if self.stopped:
            return self.process.returncode or 0
        self.stopped = True
        if self.process.poll() is None:
            with contextlib.suppress(ImportError):  # psutil: only the tests and benchmarks freeze servers
                for pid in self.server_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
        return procs.stop(self.process, timeout_s=timeout)


def start_worker(
    settings: GenqSettings,
    log_dir: Path,
    *,
    backend: str = "mlx",
    processes: int = 1,
    concurrency: int = 8,
    shutdown_grace_s: float = 10,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    cwd: Path | None = None,
    wait: bool = True,
    ready_timeout: float = 120,
    poll_interval: float = 0.05,
) -> Worker:
    """`genq worker` for `settings`, logging to a new file in `log_dir` (servers' logs in log_dir/servers)."""
    log_path = log_dir / f"worker-{backend}-{time.monotonic_ns()}.log"
    full_env = worker_env(
        settings,
        {
            "GENQ_LOG_DIR": str(log_dir / "servers"),
            "GENQ_SHUTDOWN_GRACE_S": str(shutdown_grace_s),
            # The launches it remembers (workers.prelaunch) stay with this run's files, not the user's.
            "XDG_CACHE_HOME": str(log_dir / "cache"),
            **(env or {}),
        },
    )
    argv = [sys.executable, "-m", "genq", "worker", "--model", MODEL, "--backend", backend]
    argv += ["--processes", str(processes), "--concurrency", str(concurrency), *extra_args]
    launched = time.monotonic()
    process = procs.spawn(argv, env=full_env, log_path=log_path, cwd=cwd)
    worker = Worker(
        process,
        settings,
        Backend(backend),
        processes,
        log_path,
        launched,
        ready_timeout=ready_timeout,
        poll_interval=poll_interval,
    )
    if wait:
        try:
            worker.wait_ready()
        except BaseException:
            worker.stop(timeout=10)
            raise
    return worker


def rss_mb(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def port_of(pid: int) -> int | None:
    """The --port a server was started with (genq's server supervisor always passes one)."""
    import psutil

    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == "--port":
            return int(value)
    return None
