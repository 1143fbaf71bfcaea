"""A worker's start on real parts: `genq worker` spawns its processes (each starting its server first)
before it imports the Redis side of the supervisor, so a process may be up before its supervisor has
vouched for it; such a process reads no queue until that vouch (workers.spawner). A worker started
while Redis is down waits for it with its server loaded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from genq.local_redis import LocalRedis
from genq.local_worker import SERVER_MARKERS, port_of, start_worker
from genq.worker_env import worker_env
from jobcontract import protocol
from jobcontract.connection import connect
from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend, JobState
from jobcontract.protocol.liveness import Vouch
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import wait_until
from workers.servers.supervisor import free_port
from workers.settings import WorkerSettings
from workers.spawner import Child, Spawner


@pytest.fixture
def child(settings: GenqSettings, tmp_path: Path) -> Iterator[Child]:
    worker_settings = WorkerSettings(
        redis_url=settings.redis_url,
        namespace=settings.namespace,
        models_dir=settings.models_dir,
        model="tiny",
        concurrency=2,
        log_dir=tmp_path / "servers",
    )
    spawned = Spawner(worker_settings).spawn()
    try:
        yield spawned
    finally:
        spawned.process.terminate()
        spawned.process.join(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # its server, in its process group
            os.killpg(spawned.process.pid or 0, signal.SIGKILL)
        spawned.process.join(timeout=5)


def server_answers(child: Child) -> bool:
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(child.process.pid).children():
            if any(marker in " ".join(process.cmdline()) for marker in SERVER_MARKERS):
                port = port_of(process.pid)
                with contextlib.suppress(httpx.HTTPError):
                    return bool(port) and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    return False


def test_a_worker_process_reads_no_queue_before_its_supervisor_vouched_for_it(
    settings: GenqSettings, client: Client, child: Child
) -> None:
    # The test does the Redis half of a vouch (admission then sees a live pool), not the other half:
    # telling the process it was vouched for.
    redis_client = connect(settings.redis_url)
    pool = pool_name("tiny", Backend.MLX)
    protocol.run(redis_client, Vouch(Keys(settings.namespace), pool, [child.name], [True], 120_000))
    job = client.submit({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4})
    assert wait_until(lambda: server_answers(child), timeout=120, interval=0.1), "the server never answered"
    time.sleep(1.5)  # the process has had its imports and its server: it would have read by now
    assert client.status(job).state is JobState.QUEUED
    assert not child.ready.is_set()
    child.vouched.set()
    result = client.result(job, timeout=60)
    assert result.ok and result.worker == child.name
    assert wait_until(child.ready.is_set, timeout=10)
    redis_client.close()


def imported(modules: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has imported after importing `modules`."""
    code = f"import json, sys, {modules}; print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return list(json.loads(shown))


def test_what_genq_worker_imports_before_it_launches_its_servers() -> None:
    """A remembered launch (workers.prelaunch) needs no settings, so nothing heavier than the standard
    library; the settings and the spawner need no Redis client (a third of a second here)."""
    assert imported("genq.cli, workers.prelaunch", ("pydantic", "redis", "dramatiq")) == []
    assert imported("genq.cli, workers.spawner", ("redis", "dramatiq")) == []


def test_a_worker_started_while_redis_is_down_waits_for_it_with_its_server_loaded(
    models_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    settings = GenqSettings(redis_url=f"redis://127.0.0.1:{port}/0", namespace="down", models_dir=models_dir)
    worker = start_worker(settings, tmp_path, concurrency=2, wait=False)
    try:
        assert wait_until(lambda: bool(worker.server_pids()), timeout=60, interval=0.2), worker.log()
        processes, servers = worker.worker_pids(), worker.server_pids()
        time.sleep(5)
        # Not a process exiting every few seconds and a model loaded again by each one that replaces it.
        assert worker.worker_pids() == processes and worker.server_pids() == servers, worker.log()
        assert "exited with" not in worker.log()
        with LocalRedis(port=port), Client(settings) as client:
            worker.wait_ready(timeout=60)
            result = client.generate({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4}, timeout=60)
            assert result.ok and worker.server_pids() == servers
            worker.stop()  # while its Redis still runs
    finally:
        worker.stop()


# What tests.harness.start_worker runs: the same command line, so the same remembered launch.
WORKER_COMMAND = [sys.executable, "-m", "genq", "worker", "--model", "tiny", "--backend", "mlx", "--processes", "1"]


def server_logs(log_dir: Path) -> set[Path]:
    return set((log_dir / "servers").glob("tiny.mlx.*.log"))


def servers_writing(logs: set[Path]) -> list[int]:
    """Live server processes whose output goes to one of `logs`."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.info["cmdline"] or ())
            if any(m in command for m in SERVER_MARKERS) and any(Path(f.path) in logs for f in process.open_files()):
                pids.append(process.pid)
    return pids


def test_a_command_line_run_again_launches_its_last_server_first_and_checks_it_against_its_settings(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    """`genq worker` remembers each command line's launch and starts it before reading its settings
    (workers.prelaunch). Each server launch writes a log of its own, which is how the runs below tell
    a remembered launch (one log), a launch the settings overrule (two: the first stopped at once) and
    a run whose settings fail (its remembered server stopped, none left behind)."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    def run(extra: dict[str, str]) -> tuple[set[Path], str]:
        before = server_logs(tmp_path)
        worker = start_worker(settings, tmp_path, concurrency=2, env={**env, **extra})
        try:
            assert client.generate({"model": "tiny", "prompt": "Once", "max_tokens": 4}, timeout=60).ok
            (server,) = worker.server_pids()
            return server_logs(tmp_path) - before, " ".join(psutil.Process(server).cmdline())
        finally:
            worker.stop()

    first, _ = run({})
    assert len(first) == 1 and len(list((tmp_path / "cache" / "genq" / "launches").glob("*.json"))) == 1
    again, _ = run({})
    assert len(again) == 1  # the remembered launch was the right one: nothing launched twice
    overruled, command = run({"GENQ_PROMPT_CACHE_SIZE": "7"})
    assert len(overruled) == 2 and "--prompt-cache-size 7" in command
    assert not servers_writing(overruled)  # both gone with their worker, the overruled one at once

    before = server_logs(tmp_path)
    failed = subprocess.run(
        [*WORKER_COMMAND, "--concurrency", "2"],
        env=worker_env(settings, {"GENQ_LOG_DIR": str(tmp_path / "servers"), **env, "GENQ_PROMPT_CACHE_SIZE": "-1"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0 and "prompt_cache_size" in failed.stderr, failed.stderr
    launched = server_logs(tmp_path) - before
    assert len(launched) == 1  # the remembered launch started before the settings failed...
    assert wait_until(lambda: not servers_writing(launched), timeout=10)  # ...and was stopped with them
