"""What every benchmark shares: a private Redis and the tiny model, real `genq worker` and bare
`mlx_lm.server` processes, a direct client for the side-by-side figures, and distinct prompts.

Every process a benchmark starts belongs to its `Lab`, which stops them all on the way out, so a
failed run leaves nothing behind on a machine shared with others.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import psutil
import redis

from bench.report import Options
from genq.local_redis import LocalRedis
from genq.tiny_model import ensure_tiny_model
from jobcontract.connection import connect
from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings

REPO_DIR = Path(__file__).resolve().parents[1]
SERVER_MARKERS = ("mlx_lm.server", "llama_cpp.server", "llama-server")
MODEL = "tiny"

T = TypeVar("T")
R = TypeVar("R")


# -- processes -------------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def port_of(pid: int) -> int | None:
    """The --port a server was started with (genq's server supervisor always passes one)."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == "--port":
            return int(value)
    return None


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This shell's environment without its GENQ_ settings, so a benchmark measures what it says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, **extra}


@dataclass
class WorkerProc:
    """A real `genq worker` subprocess: the supervisor, its worker processes and their servers."""

    process: subprocess.Popen[bytes]
    settings: GenqSettings
    backend: Backend
    processes: int
    log_path: Path
    launched: float  # monotonic

    @property
    def pid(self) -> int:
        return self.process.pid

    def pool_members(self, client: redis.Redis | None = None) -> int:
        own = client or redis.Redis.from_url(self.settings.redis_url)
        try:
            return int(own.zcount(Keys(self.settings.namespace).pool(pool_name(MODEL, self.backend)), "-inf", "+inf"))
        finally:
            if client is None:
                own.close()

    def wait_ready(self, processes: int | None = None, timeout: float = 300) -> float:
        """Block until every process serves (has joined its pool, its server is up); returns seconds
        since launch. Polls gently: on 2 cores a busy poller would slow the start it measures."""
        wanted = processes or self.processes
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            while self.pool_members(client) < wanted or len(self.server_pids()) < wanted:
                if self.process.poll() is not None:
                    raise RuntimeError(f"genq worker exited with {self.process.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"genq worker not ready after {timeout:.0f}s:\n{self.log()}")
                time.sleep(0.02)
        finally:
            client.close()
        return time.monotonic() - self.launched

    def worker_pids(self) -> list[int]:
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
        servers = self.server_pids()
        try:
            tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return {"genq_mb": 0.0, "servers_mb": 0.0}
        own = sum(rss_mb(p.pid) for p in tree if p.pid not in servers)
        return {"genq_mb": own, "servers_mb": sum(rss_mb(p) for p in servers)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            for pid in self.server_pids():  # a server frozen by a benchmark must be able to stop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BareServer:
    """`mlx_lm.server` alone, started with the command line a genq worker gives it: the alternative."""

    def __init__(self, model_path: Path, *, concurrency: int, log_path: Path) -> None:
        from workers.servers.specs import mlx_spec
        from workers.servers.supervisor import free_port
        from workers.settings import WorkerSettings

        defaults = WorkerSettings()
        self.spec = mlx_spec(
            str(model_path), concurrency=concurrency, max_tokens=defaults.max_tokens_cap, hub_cache=defaults.hub_cache
        )
        self.model = str(model_path)
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.launched = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.launched = time.monotonic()
            self.process = subprocess.Popen(
                self.spec.argv(self.port),
                env=clean_env(self.spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 180) -> float:
        """Block until /health answers 200; returns seconds since launch."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.url + "/health").status_code == 200:
                        return time.monotonic() - self.launched
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlx_lm.server did not start; see {self.log_path}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class DirectClient:
    """Completions straight to a server, as an application without genq would send them, plain or
    streamed (as a genq worker asks for them). mlx_lm.server's HTTP server now and then resets a
    kept-alive connection under a burst of them; like any real client this one tries again, and
    counts how often."""

    def __init__(self, url: str, model: str | None, *, connections: int = 8) -> None:
        self.url = url
        self.model = model
        self.retries = 0
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.Client(limits=limits, timeout=300)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = False) -> tuple[float, int]:
        """Returns (latency in seconds, including any retry; completion tokens)."""
        started = time.perf_counter()
        for attempt in range(3):
            try:
                tokens = self._once(prompt, max_tokens, stream)
                return time.perf_counter() - started, tokens
            except httpx.TransportError:
                if attempt == 2:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

    def _once(self, prompt: str, max_tokens: int, stream: bool) -> int:
        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if self.model is not None:
            payload["model"] = self.model
        if not stream:
            response = self.http.post(self.url + "/v1/completions", json=payload)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
        tokens, pieces = 0, []
        with self.http.stream("POST", self.url + "/v1/completions", json=payload) as response:
            response.raise_for_status()
            for line in response.iter_lines():  # every chunk read as a streaming caller reads it
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                pieces += [c.get("text") or "" for c in chunk.get("choices") or ()]
                tokens = int((chunk.get("usage") or {}).get("completion_tokens") or tokens)
        return tokens


def closed_loop(concurrency: int, items: Sequence[T], call: Callable[[T], R]) -> tuple[list[R], float]:
    """Keep `concurrency` calls in flight until every item is done; returns the results and the wall time."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(call, items))
        return results, time.perf_counter() - started


# A fixed vocabulary for the prompts, so every run sends the same texts.
WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "a", "worker"),
    *("owns", "its", "server", "and", "redis", "streams", "deliver", "each", "entry", "to", "the"),
    *("first", "idle", "consumer"),
]


def prompts(n: int, tag: str, words: int = 12) -> list[str]:
    """Distinct prompts of equal length, so no side gains from the server's prompt cache."""
    return [f"{tag} {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) for i in range(n)]


# -- the lab ---------------------------------------------------------------------------------------------
class Lab:
    """A private redis-server, the tiny model and a scratch folder; every process started through it
    is stopped when it closes. Logs are kept (and their folder printed) when the run failed."""

    def __init__(self, options: Options, name: str, *, redis_appendonly: bool = False) -> None:
        self.options = options
        self.name = name
        self.redis = LocalRedis(appendonly=redis_appendonly)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"genq-bench-{name}-"))
        models_dir = options.models_dir or GenqSettings().models_dir
        self.models_dir = models_dir.expanduser()
        self.mlx_model, self.gguf_model = ensure_tiny_model(self.models_dir)
        self.workers: list[WorkerProc] = []
        self.servers: list[BareServer] = []
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Self:
        self.redis.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for worker in reversed(self.workers):
            with contextlib.suppress(Exception):
                worker.stop()
        for server in self.servers:
            server.stop()
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        self.redis.close()
        if error is None and not self.options.keep_logs:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            print(f"bench {self.name}: logs kept in {self.run_dir}", file=sys.stderr)

    @property
    def url(self) -> str:
        return self.redis.url

    def client(self) -> redis.Redis:
        client = connect(self.url)
        self.closers.append(client.close)
        return client

    def settings(self, namespace: str | None = None, routes_file: Path | None = None, **extra: Any) -> GenqSettings:
        return GenqSettings(
            redis_url=self.url,
            namespace=namespace or f"b{uuid.uuid4().hex[:8]}",
            models_dir=self.models_dir,
            routes_file=routes_file,
            **extra,
        )

    def routes(self, name: str, backends: Sequence[Mapping[str, Any]]) -> Path:
        """A routes file for the tiny model; each backend a mapping of BackendRoute fields."""
        lines = ["[[models]]", f'name = "{MODEL}"', ""]
        for backend in backends:
            lines.append("[[models.backends]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in backend.items()]
            lines.append("")
        path = self.run_dir / f"routes-{name}.toml"
        path.write_text("\n".join(lines))
        return path

    def mlx_route(self, **fields: Any) -> dict[str, Any]:
        """The tiny model on mlx with timeouts no healthy run reaches, unless a benchmark says otherwise."""
        return {"path": str(self.mlx_model), "first_token_timeout_s": 120.0, "token_timeout_s": 120.0, **fields}

    def start_worker(
        self,
        settings: GenqSettings,
        *,
        backend: str = "mlx",
        processes: int = 1,
        concurrency: int = 8,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProc:
        log_path = self.run_dir / f"worker-{backend}-{len(self.workers)}.log"
        full_env = clean_env(
            {
                "GENQ_REDIS_URL": settings.redis_url,
                "GENQ_NAMESPACE": settings.namespace,
                "GENQ_MODELS_DIR": str(settings.models_dir),
                "GENQ_LOG_DIR": str(self.run_dir / "servers"),
                "GENQ_SHUTDOWN_GRACE_S": "5",
                "GENQ_MAX_QUEUED_JOBS": str(settings.max_queued_jobs),
                **({"GENQ_ROUTES_FILE": str(settings.routes_file)} if settings.routes_file else {}),
                **(env or {}),
            }
        )
        argv = [sys.executable, "-m", "genq", "worker", "--model", MODEL, "--backend", backend]
        argv += ["--processes", str(processes), "--concurrency", str(concurrency)]
        with log_path.open("wb") as log_file:
            launched = time.monotonic()
            process = subprocess.Popen(
                argv, env=full_env, cwd=REPO_DIR, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        worker = WorkerProc(process, settings, Backend(backend), processes, log_path, launched)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def stop_worker(self, worker: WorkerProc) -> None:
        worker.stop()
        self.workers.remove(worker)

    def bare_mlx(self, *, concurrency: int) -> BareServer:
        server = BareServer(
            self.mlx_model, concurrency=concurrency, log_path=self.run_dir / f"bare-mlx-{len(self.servers)}.log"
        )
        self.servers.append(server)
        return server

    def stop_server(self, server: BareServer) -> None:
        server.stop()
        self.servers.remove(server)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
