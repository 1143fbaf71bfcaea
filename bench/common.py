"""What every benchmark shares: the local stack (genq/local_stack.py: a private Redis, the tiny
model, real `genq worker` processes), bare `mlx_lm.server` processes, a direct client for the
side-by-side figures, and distinct prompts.

Every process a benchmark starts belongs to its `Lab`, which stops them all on the way out, and
dies with the benchmark even when it is killed, so a failed run leaves nothing behind on a machine
shared with others.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from redis import Redis

from bench.report import Options
from genq.local_redis import LocalRedis
from genq.local_stack import LocalStack
from genq.local_worker import MODEL, SERVER_MARKERS, Worker, port_of, rss_mb
from genq.processes import spawn
from genq.processes import stop as stop_process
from genq.worker_env import base_env
from jobcontract.connection import connect
from jobcontract.settings import GenqSettings

REPO_DIR = Path(__file__).resolve().parents[1]
__all__ = ["MODEL", "SERVER_MARKERS", "port_of", "rss_mb"]

T = TypeVar("T")
R = TypeVar("R")


# -- processes -------------------------------------------------------------------------------------------
def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This shell's environment without its GENQ_ settings (the local stack's one rule), plus `extra`."""
    return base_env(extra)


# A real `genq worker` subprocess: the supervisor, its worker processes and their servers.
WorkerProc = Worker


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
        self.launched = time.monotonic()
        self.process = spawn(self.spec.argv(self.port), env=clean_env(self.spec.env), log_path=self.log_path)

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
        if self.process is not None:
            stop_process(self.process, timeout_s=10)


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
    """The local stack (genq/local_stack.py: a private redis-server, the tiny model, workers that
    die with this process) with a scratch folder, bare servers and anything else a benchmark
    opens; all stopped when it closes. Logs are kept (and their folder printed) when the run failed."""

    def __init__(self, options: Options, name: str, *, redis_appendonly: bool = False) -> None:
        self.options = options
        self.name = name
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"genq-bench-{name}-"))
        self.stack = LocalStack(models_dir=options.models_dir, run_dir=self.run_dir, redis_appendonly=redis_appendonly)
        self.models_dir = self.stack.models_dir
        self.mlx_model, self.gguf_model = self.stack.mlx_model, self.stack.gguf_model
        self.servers: list[BareServer] = []
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Self:
        self.stack.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        with contextlib.ExitStack() as cleanup:  # the stack (Redis, workers) goes last, whatever fails before
            cleanup.callback(self.stack.close)
            for server in self.servers:
                server.stop()
            for close in reversed(self.closers):
                with contextlib.suppress(Exception):
                    close()
        if error is None and not self.options.keep_logs:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            print(f"bench {self.name}: logs kept in {self.run_dir}", file=sys.stderr)

    @property
    def redis(self) -> LocalRedis:
        assert self.stack.redis is not None
        return self.stack.redis

    @property
    def workers(self) -> list[Worker]:
        return self.stack.workers

    @property
    def url(self) -> str:
        return self.stack.url

    def client(self) -> Redis:
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

    def routes(self, name: str, backends: Sequence[Mapping[str, Any]], **model_fields: Any) -> Path:
        """A routes file for the tiny model; each backend a mapping of BackendRoute fields, and
        `model_fields` ModelRoute fields (prefix_chars)."""
        lines = [
            "[[models]]",
            f'name = "{MODEL}"',
            *(f"{key} = {json.dumps(v)}" for key, v in model_fields.items()),
            "",
        ]
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
        worker = self.stack.start_worker(
            settings,
            backend=backend,
            processes=processes,
            concurrency=concurrency,
            env=env,
            shutdown_grace_s=5,
            cwd=REPO_DIR,
            wait=False,
            ready_timeout=300,
            poll_interval=0.02,
        )
        if wait:
            worker.wait_ready()
        return worker

    def stop_worker(self, worker: WorkerProc) -> None:
        self.stack.stop_worker(worker)

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
