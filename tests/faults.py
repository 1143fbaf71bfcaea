"""Helpers for the fault tests: find the real processes behind a consumer name, read what Redis
holds for each of them, count deliveries, and wait for results through outages."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dramatiq
import httpx
import psutil
import redis

from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.models import GenerationResult
from producer.client import Client, GenqUnavailable
from tests.harness import SERVER_MARKERS, WorkerHandle
from tests.queues import partition_streams

POISON_SITE = Path(__file__).resolve().parent / "poison_site"
POISON_MARKER = "GENQ-POISON-PILL"
GENERATION_DIES_MARKER = "GENQ-GENERATION-DIES"

# A worker process logs "<date> <time> <consumer> INFO workers.servers.supervisor: starting <server> on port N".
_SERVER_START = re.compile(
    r"^\S+ \S+ (?P<consumer>\S+) \w+ workers\.servers\.supervisor: starting \S+ on port (?P<port>\d+)"
)


@dataclass(frozen=True)
class WorkerProcess:
    """One worker process of a `genq worker`: its pid, its consumer name, its server."""

    pid: int
    consumer: str
    server_pid: int
    server_port: int


def server_of(worker_pid: int) -> tuple[int, int] | None:
    """(pid, port) of the backend server a worker process owns, from the real process table."""
    try:
        for child in psutil.Process(worker_pid).children():
            argv = child.cmdline()
            if any(m in " ".join(argv) for m in SERVER_MARKERS) and "--port" in argv:
                return child.pid, int(argv[argv.index("--port") + 1])
    except psutil.NoSuchProcess:
        return None
    return None


def worker_processes(handle: WorkerHandle) -> list[WorkerProcess]:
    """Every serving worker process, named as Redis knows it: the log line that started the server
    on the port its live server listens on names the consumer."""
    ports: dict[int, str] = {}
    for line in handle.log_path.read_text(errors="replace").splitlines():
        match = _SERVER_START.match(line)
        if match:
            ports[int(match["port"])] = match["consumer"]
    found = []
    for pid in handle.worker_pids():
        server = server_of(pid)
        if server is not None and server[1] in ports:
            found.append(WorkerProcess(pid=pid, consumer=ports[server[1]], server_pid=server[0], server_port=server[1]))
    return found


def _all_partitions(client: redis.Redis, keys: Keys) -> list[str]:
    """Every stream of every queue: each queue's own and its partitions (tenants, prefix shards)."""
    return [s for raw in client.smembers(keys.queues) for s in partition_streams(client, keys, _text(raw))]


def pending_jobs(client: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Consumer name -> ids of the jobs whose stream entries it holds unacked, across every queue."""
    held: dict[str, list[str]] = {}
    for stream in _all_partitions(client, keys):
        try:
            entries = client.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=10_000)
        except redis.ResponseError:
            continue
        for entry in entries:
            found = client.xrange(stream, min=entry["message_id"], max=entry["message_id"])
            if found:
                message = dramatiq.Message.decode(found[0][1][b"m"])
                held.setdefault(_text(entry["consumer"]), []).append(message.message_id)
    return held


def done_entries(client: redis.Redis, keys: Keys, job_id: str) -> int:
    """How many `done` announcements a job's event stream carries: a caller is told once per entry."""
    return sum(1 for _id, fields in client.xrange(keys.events(job_id)) if fields.get(b"type") == b"done")


def duplicated(client: redis.Redis, keys: Keys, job_ids: Iterable[str]) -> int:
    return sum(max(0, done_entries(client, keys, j) - 1) for j in job_ids)


def starts(client: redis.Redis, keys: Keys, job_id: str) -> int:
    return int(client.hget(keys.job(job_id), "starts") or 0)


def collect(client: Client, job_ids: Sequence[str], timeout: float) -> tuple[dict[str, GenerationResult], int]:
    """Wait for every result like a patient caller: a GenqUnavailable (Redis away) is retried, never
    fatal. Returns the results found and how many retryable errors the caller saw."""
    deadline = time.monotonic() + timeout
    results: dict[str, GenerationResult] = {}
    errors = 0
    while len(results) < len(job_ids) and time.monotonic() < deadline:
        missing = [j for j in job_ids if j not in results]
        try:
            batch = missing[:200]
            for result in client.results(batch, timeout=min(10.0, max(0.1, deadline - time.monotonic()))):
                results[result.job_id] = result
        except TimeoutError:
            for job_id in missing:
                with _quiet_redis():
                    found = client.store.result(job_id)
                    if found is not None:
                        results[job_id] = found
        except GenqUnavailable:
            errors += 1
            time.sleep(0.2)
    return results, errors


class _quiet_redis:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, redis.RedisError)


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def freeze(*pids: int) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


def thaw(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            continue


def wait_for(predicate, timeout: float, interval: float = 0.02) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until predicate() held, or None if it never did within timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def write_routes(path: Path, models_dir: Path, *, mlx: str = "", llamacpp: str = "") -> Path:
    """A routes file for the tiny model, mlx first then llama.cpp, each with extra TOML lines."""
    path.write_text(
        f"""
[[models]]
name = "tiny"

[[models.backends]]
path = "{models_dir / "tiny-llama"}"
{mlx}

[[models.backends]]
path = "{models_dir / "tiny-llama.gguf"}"
context_length = 512
{llamacpp}
"""
    )
    return path


def attempts_generating(client: redis.Redis, keys: Keys, job_id: str) -> int:
    """How many attempts of a streamed job have sent a first token: each attempt numbers its tokens from 0."""
    return sum(
        1
        for _id, fields in client.xrange(keys.events(job_id))
        if fields.get(b"type") == b"token" and fields[b"i"] == b"0"
    )


def held_message(client: redis.Redis, keys: Keys, job_id: str) -> dramatiq.Message[object] | None:
    """The dramatiq message of a job as its pending stream entry holds it (what the worker runs now)."""
    for stream in _all_partitions(client, keys):
        try:
            entries = client.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=10_000)
        except redis.ResponseError:
            continue
        for entry in entries:
            found = client.xrange(stream, min=entry["message_id"], max=entry["message_id"])
            if found:
                message = dramatiq.Message.decode(found[0][1][b"m"])
                if message.message_id == job_id:
                    return message
    return None
