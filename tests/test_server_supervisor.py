"""ServerSupervisor against a stand-in server process: a few lines of http.server whose /health can be
told to refuse (503, as mlx_lm.server answers once its generation thread died) by a file named for
its pid. Fast, and exact about the moments that a real server makes a race of."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobcontract.models import Backend
from tests.harness import wait_until
from workers.servers.specs import ServerSpec
from workers.servers.supervisor import ServerSupervisor

STAND_IN = """
import http.server, os, sys
flag = os.path.join(sys.argv[1], f"refuse-{os.getpid()}")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = 503 if os.path.exists(flag) else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[3])), Handler).serve_forever()
"""


@pytest.fixture
def spec(tmp_path: Path) -> ServerSpec:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return ServerSpec(
        name="stand-in",
        backend=Backend.MLX,
        argv_head=(sys.executable, str(script), str(tmp_path)),
        port_flag="--port",
        readiness_path="/health",
    )


@pytest.fixture
def supervisor(spec: ServerSpec, tmp_path: Path) -> Iterator[ServerSupervisor]:
    server = ServerSupervisor(spec, log_path=tmp_path / "server.log", start_timeout_s=30)
    try:
        yield server
    finally:
        server.stop(grace_s=1)


def refuse(tmp_path: Path, pid: int | None) -> None:
    assert pid is not None
    (tmp_path / f"refuse-{pid}").touch()


def test_a_server_found_refusing_service_lets_no_job_in_before_it_is_restarted(
    supervisor: ServerSupervisor, tmp_path: Path
) -> None:
    # Started without its watcher: what a job sees between finding the refusal and the restart.
    supervisor._launch_until_ready()
    pid = supervisor.pid
    assert supervisor.wait_ready(0) and not supervisor.died_since(pid)
    refuse(tmp_path, pid)
    assert supervisor.died_since(pid)  # the job that was refused is not charged for it
    # A job retried alone after that failure must not be sent to the same refusing server: it would
    # be charged with a death of its own, and twice makes an innocent job poison.
    assert not supervisor.wait_ready(0)
    assert supervisor.pid == pid


def test_a_refusing_server_is_restarted_at_once_and_serves_again(supervisor: ServerSupervisor, tmp_path: Path) -> None:
    supervisor.hang_timeout_s = 60.0  # a restart here is the refusal's, never a hang timeout's
    supervisor.start()
    first = supervisor.pid
    refuse(tmp_path, first)
    began = time.monotonic()
    assert supervisor.died_since(first)
    assert wait_until(lambda: supervisor.pid != first and supervisor.wait_ready(0), timeout=20, interval=0.02)
    assert time.monotonic() - began < supervisor.hang_timeout_s
    assert not supervisor.died_since(supervisor.pid)


def test_a_refusal_seen_on_a_replaced_server_leaves_its_successor_serving(
    supervisor: ServerSupervisor, tmp_path: Path
) -> None:
    supervisor.start()
    first = supervisor.pid
    refuse(tmp_path, first)
    assert supervisor.died_since(first)
    assert wait_until(lambda: supervisor.pid != first and supervisor.wait_ready(0), timeout=20, interval=0.02)
    successor = supervisor.pid
    # Another job cut off by the first server asks late: the answer is about the server it ran on.
    assert supervisor.died_since(first)
    assert supervisor.wait_ready(0) and supervisor.pid == successor
