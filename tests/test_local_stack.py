"""Processes the tests start die with them: a fixture that fails after starting a worker leaves
nothing running, and a SIGKILLed parent takes its redis-server, `genq worker`, worker processes
and mlx_lm.server with it (genq/processes.py, tests/process_guard.py).

Both run a real parent (an inner pytest session, a plain script) in a subprocess, so the process
under test is not this pytest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from tests.harness import wait_until

REPO = Path(__file__).resolve().parents[1]

# Like tests/test_prometheus.py's fixture when promtool was missing: workers started, then a failure
# before the fixture's teardown exists. A later test of the same session checks they are gone.
FAILING_FIXTURE = """
import json, os
from pathlib import Path

import psutil
import pytest

from tests.harness import start_worker

PIDS = Path(os.environ["PIDS_FILE"])


@pytest.fixture
def workers(settings, tmp_path):
    handle = start_worker(settings, tmp_path, wait=False)
    handle.wait_ready()
    tree = [handle.pid, *(p.pid for p in psutil.Process(handle.pid).children(recursive=True))]
    PIDS.write_text(json.dumps({"tree": tree, "servers": handle.server_pids()}))
    raise FileNotFoundError("promtool is not installed")


def test_needs_the_workers(workers):
    pass


def test_after_the_failed_fixture_nothing_it_started_runs():
    found = json.loads(PIDS.read_text())
    assert found["servers"], "the fixture did not get as far as a server"
    assert not [pid for pid in found["tree"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
"""

# A parent that starts a private Redis and a worker, says what runs, then waits to be killed.
PARENT = """
import json, sys, time
from pathlib import Path

import psutil

from genq.local_redis import LocalRedis
from jobcontract.settings import GenqSettings
from tests.harness import start_worker

redis_server = LocalRedis().start()
settings = GenqSettings(redis_url=redis_server.url, namespace="orphans", models_dir=Path(sys.argv[1]))
handle = start_worker(settings, Path(sys.argv[2]), processes=1)
tree = [handle.pid, *(p.pid for p in psutil.Process(handle.pid).children(recursive=True))]
print(json.dumps({"redis": redis_server.process.pid, "tree": tree, "servers": handle.server_pids()}), flush=True)
time.sleep(600)
"""


def child_env() -> dict[str, str]:
    """For the parents these tests start: this checkout first on the path, no GENQ_ settings."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}, "PYTHONPATH": path}


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def described(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            lines.append(f"{process.pid}: {' '.join(process.cmdline())[:150]}")
        except psutil.Error:
            lines.append(str(process.pid))
    return "\n".join(lines)


def test_a_fixture_that_fails_after_starting_a_worker_leaves_no_process(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(textwrap.dedent(FAILING_FIXTURE))
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')  # the suite's own fixtures and hooks
    pids_file = tmp_path / "pids.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=inner,
        env={**child_env(), "PIDS_FILE": str(pids_file)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pids_file.exists(), run.stdout + run.stderr
    found = json.loads(pids_file.read_text())
    # The fixture errored, and the next test of the same session saw nothing of it running.
    assert "1 passed, 1 error" in run.stdout, run.stdout + run.stderr
    leftovers = running([psutil.Process(pid) for pid in found["tree"] if psutil.pid_exists(pid)])
    assert not leftovers, described(leftovers)


def test_a_sigkilled_parent_takes_its_redis_workers_and_servers_with_it(models_dir: Path, tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(models_dir), str(tmp_path)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    started: list[psutil.Process] = []
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, f"the parent exited with {parent.wait()} before its worker was ready"
        found = json.loads(line)
        assert found["servers"], "the worker has no server"
        started = [psutil.Process(pid) for pid in [found["redis"], *found["tree"]] if psutil.pid_exists(pid)]
        assert len(started) >= 4  # redis-server, the supervisor, a worker process, its server

        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)

        # The supervisor dies with the parent; its worker process, told by the kernel, stops
        # gracefully and its server dies with it.
        assert wait_until(lambda: not running(started), timeout=60), described(running(started))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for process in running(started):
            process.kill()
