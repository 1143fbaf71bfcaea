"""genq on one machine, for `genq demo`, the benchmarks (bench/) and the tests (tests/harness.py):
a private `redis-server`, the tiny model, and real `genq worker` processes started and stopped for
sure (genq/processes.py: they die with their starter, even when it is SIGKILLed).

One rule for a worker's environment (`worker_env`): this process's environment *without* any
`GENQ_` variable, plus the stack's settings written out as `GENQ_` variables. A worker serves what
its starter's settings object says and nothing else: a `GENQ_REDIS_URL` or `GENQ_PROCESSES` left in
a shell (on a shared machine, the shared Redis) can never point a test, a benchmark or the demo
at another Redis or change what it measures. Anything else a worker needs is passed explicitly.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from genq import processes as procs
from genq.local_redis import LocalRedis
from genq.tiny_model import ensure_tiny_model
from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings

SERVER_MARKERS = ("mlx_lm.server", "llama_cpp.server", "llama-server")
MODEL = "tiny"
_NOT_PASSED = ("PROMETHEUS_MULTIPROC_DIR",)  # a worker with metrics makes its own


def settings_env(settings: GenqSettings) -> dict[str, str]:
    """Every shared setting as the `GENQ_` variable that gives it (unset optional ones left out)."""
    env = {}
    for name in GenqSettings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"GENQ_{name.upper()}"] = str(value)
    return env


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its GENQ_ settings, plus `extra`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_") and k not in _NOT_PASSED}
    return {**inherited, **(extra or {})}


def worker_env(settings: GenqSettings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the stack starts: see the module's docstring for why."""
    return base_env({**settings_env(settings), **(extra or {})})


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
            while self.pool_members(client) < wanted or (servers and len(self.server_pids()) < wanted):
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
        {"GENQ_LOG_DIR": str(log_dir / "servers"), "GENQ_SHUTDOWN_GRACE_S": str(shutdown_grace_s), **(env or {})},
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


class LocalStack:
    """A private redis-server (unless given a Redis URL), the tiny model, a scratch folder, and
    every worker started through it, all stopped when it closes (in reverse order), whether the
    block ended well or not."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        models_dir: Path | None = None,
        run_dir: Path | None = None,
        redis_appendonly: bool = False,
    ) -> None:
        self._given_url = redis_url
        self._appendonly = redis_appendonly
        self.models_dir = (models_dir or GenqSettings().models_dir).expanduser()
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="genq-stack-"))
        self.redis: LocalRedis | None = None
        self.workers: list[Worker] = []
        self.exits = ExitStack()
        self.mlx_model, self.gguf_model = ensure_tiny_model(self.models_dir)

    def __enter__(self) -> Self:
        try:
            if self._given_url is None:
                self.redis = self.exits.enter_context(LocalRedis(appendonly=self._appendonly))
        except BaseException:
            self.exits.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.exits.close()

    @property
    def url(self) -> str:
        if self._given_url is not None:
            return self._given_url
        assert self.redis is not None, "enter the stack first"
        return self.redis.url

    def settings(self, **fields: object) -> GenqSettings:
        """Settings on this stack's Redis and models; `fields` override (namespace, routes_file, ...)."""
        base = GenqSettings(redis_url=self.url, models_dir=self.models_dir)
        return base.model_copy(update=fields)

    def start_worker(self, settings: GenqSettings, **options: Any) -> Worker:
        """`start_worker` with this stack's scratch folder; stopped when the stack closes."""
        worker = start_worker(settings, self.run_dir, **options)
        self.workers.append(worker)
        self.exits.callback(self._stop, worker)
        return worker

    def stop_worker(self, worker: Worker) -> None:
        self._stop(worker)

    def _stop(self, worker: Worker) -> None:
        worker.stop()
        if worker in self.workers:
            self.workers.remove(worker)
