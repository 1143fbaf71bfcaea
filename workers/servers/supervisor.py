"""Owns one backend server subprocess: start on a free loopback port, wait until ready, restart it
when it dies or freezes, stop it with its worker.

No orphans: the server runs in its worker's process group (the worker process leads its own
group), so whoever reaps a dead worker kills the group; on Linux the kernel also sends the
server SIGKILL the moment its worker dies (PR_SET_PDEATHSIG), whatever killed it.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # specs imports the job models (pydantic): this module must stay light (workers.boot)
    from workers.servers.specs import ServerSpec

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# How often a starting server is asked whether it is ready: a refused connection costs next to nothing,
# and every poll skipped is time the worker waits after its server could serve.
READY_POLL_S = 0.02
# An idle server is probed this seldom: a probe (a new connection and a request) is 1 ms of the worker's
# CPU, most of an idle worker's cost at one a second (issue #12). A job's lease wakes the probe at once
# and probes it every `probe_interval_s` while any is held, so a frozen server still fails no job later;
# an idle frozen one is restarted this much later, and one that exits is seen at once (its exit wakes it).
IDLE_PROBE_INTERVAL_S = 5.0


class ServerFailed(RuntimeError):
    """The server could not be brought up (it exited, or never became ready)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_pdeathsig


@dataclass(frozen=True)
class Launched:
    """A server process started by `Launch.start`, for a ServerSupervisor to adopt."""

    process: subprocess.Popen[bytes]
    port: int
    log_file: IO[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)  # when its load began


@dataclass(frozen=True)
class Launch:
    """A server's command as plain data (ServerSpec.launch), so a new worker process can start its
    server before it imports anything else (workers.boot) and load the model while it imports."""

    name: str
    argv_head: tuple[str, ...]
    port_flag: str
    env: dict[str, str]
    log_path: str  # `{pid}` stands for the worker process's id

    def start(self) -> Launched:
        """Start the server (logging nothing: a worker process launches it before its logging is set
        up, then calls `announce`)."""
        port = free_port()
        path = Path(self.log_path.format(pid=os.getpid()))
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = path.open("ab")
        return Launched(_popen([*self.argv_head, self.port_flag, str(port)], self.env, log_file), port, log_file, path)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "argv_head": list(self.argv_head),
            "port_flag": self.port_flag,
            "env": self.env,
            "log_path": self.log_path,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Launch:
        return cls(
            str(data["name"]),
            tuple(str(a) for a in data["argv_head"]),
            str(data["port_flag"]),
            {str(k): str(v) for k, v in dict(data["env"]).items()},
            str(data["log_path"]),
        )


def announce(name: str, port: int) -> None:
    """The line that says which server a worker process started on which port (tests/faults.py reads
    it to tell the processes apart)."""
    log.info("starting %s on port %d", name, port)


def _popen(argv: list[str], spec_env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    # The server needs none of genq's settings, and some are secrets (the Redis password).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}, **spec_env}
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent(),
        close_fds=True,
    )


class JobServer(Protocol):
    """What a job needs of the server it runs on: a ServerSupervisor, or a multi-model worker's handle
    on one of its models (workers.models.manager.ModelHandle), which loads the model on demand."""

    @property
    def spec(self) -> ServerSpec: ...
    @property
    def base_url(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def load_wait_s(self) -> float:
        """How long a job may wait for the server to come up beyond its first-token timeout: a load."""
        ...

    def using(self) -> contextlib.AbstractContextManager[None]:
        """Held for one attempt: a multi-model worker never unloads a model a job generates on, and
        a server is probed more often while a job holds it (ServerSupervisor.using)."""
        ...

    def wait_ready(self, timeout_s: float) -> bool: ...
    def died_since(self, pid: int | None) -> bool: ...
    def silent_s(self) -> float: ...


class ServerSupervisor:
    load_wait_s = 0.0  # started with its worker: a job never waits for its load

    def __init__(
        self,
        spec: ServerSpec,
        *,
        log_path: Path,
        start_timeout_s: float = 120.0,
        probe_interval_s: float = 0.25,
        idle_probe_interval_s: float = IDLE_PROBE_INTERVAL_S,
        hang_timeout_s: float = 2.0,
        on_state: Callable[[str], None] | None = None,
        start_again_on_exit: bool = True,
    ) -> None:
        """`start_again_on_exit`: a server that exits during its start is started again (on another
        port: the usual cause is a port taken between choosing and binding it). A multi-model worker
        turns it off: there the likelier cause is memory, and its manager decides what to unload
        before it loads that model again."""
        self.spec = spec
        self.start_again_on_exit = start_again_on_exit
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.probe_interval_s = probe_interval_s
        self.idle_probe_interval_s = max(probe_interval_s, idle_probe_interval_s)
        self._in_use = 0  # leases held (`using`): the probe runs faster while the server works
        self._busy_since = 0.0
        self._wake = threading.Event()  # set by stop(), a server's exit, and a first lease after idling
        self._refused_by: int | None = None  # the pid of a server a job found refusing service
        self.hang_timeout_s = hang_timeout_s
        self.on_state = on_state or (lambda _state: None)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._lock_calls = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._log_file: IO[bytes] | None = None
        self._answered_at = time.monotonic()
        self._launched = False  # adopted (`adopt`), not yet waited for

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def adopt(self, launched: Launched) -> None:
        """Take over a server started by `Launch.start`; `start` then waits for it instead of launching one."""
        with self._lock:
            self.process, self.port, self._log_file, self.log_path = (
                launched.process,
                launched.port,
                launched.log_file,
                launched.log_path,
            )
        self._launched = True
        self._wake_when_exits(launched.process)

    def start(self) -> None:
        """Launch (unless one was adopted) and block until ready; then keep watching it from a background thread."""
        self._launch_until_ready()
        self._monitor = threading.Thread(target=self._watch, name=f"watch-{self.spec.name}", daemon=True)
        self._monitor.start()

    def died_since(self, pid: int | None) -> bool:
        """Whether the server process that was running as `pid` has exited (or been replaced)."""
        process = self.process
        if process is None or process.pid != pid:
            return True
        try:  # its socket closes a moment before the kernel reports the exit
            process.wait(timeout=0.5)
            return True
        except subprocess.TimeoutExpired:
            return not self.ready.is_set() or self._refuses_service()

    def _refuses_service(self) -> bool:
        """Whether the live server says it can serve no more: its liveness probe answers with an error
        (mlx_lm.server's /health says 503 once its generation thread died, and every request then
        fails while the process lives on). Such a server is restarted at once, not a hang timeout
        later, and the jobs it failed are not charged for it. A probe that gets no answer proves
        nothing here (a busy server may be slow); the watcher's hang timeout judges that."""
        with self._lock:
            process, port = self.process, self.port
        status = self._probe(self.spec.liveness_path, port=port)
        if process is None or status is None or status < 400:
            return False
        with self._lock:
            # That server, not a successor started meanwhile: several jobs cut off at once each ask,
            # and a late answer from the old one must not restart the new one.
            if self.process is process and self.ready.is_set():
                # Not ready from now, not from when the watcher wakes: a job let in meanwhile (one
                # retried alone after this very failure) would be refused too, and charged for it.
                self.ready.clear()
                self._refused_by = process.pid
        self._wake.set()
        return True

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Held by a job for one attempt (JobServer.using; a multi-model worker's ModelHandle holds
        it while its job generates). While one is held the server is probed every
        `probe_interval_s` (a plain completion learns from the probe that its server froze); while
        none is, every `idle_probe_interval_s`: an idle worker's probes are most of what it costs
        the machine, and a frozen idle server is still restarted, a probe interval later."""
        with self._lock_calls:
            self._in_use += 1
            if self._in_use == 1:  # from idle: silence counts from now, and the probe wakes at once
                self._busy_since = time.monotonic()
                self._wake.set()
        try:
            yield
        finally:
            with self._lock_calls:
                self._in_use -= 1

    def silent_s(self) -> float:
        """Seconds since the server last answered a probe: what a plain (non-streamed) completion,
        which sees no tokens, watches to tell a frozen server from a slow answer."""
        return time.monotonic() - max(self._answered_at, self._busy_since)

    def wait_ready(self, timeout_s: float) -> bool:
        if self.process is not None and self.process.poll() is not None:
            self.ready.clear()  # died since the last probe: don't send it anything
        return self.ready.wait(max(0.0, timeout_s))

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        self.ready.clear()
        with self._lock:
            self._terminate(grace_s)
        if self._monitor is not None:
            self._monitor.join(timeout=grace_s + 1)
        if self._log_file is not None:
            self._log_file.close()

    # -- internals -------------------------------------------------------------------------------------
    def _launch_until_ready(self) -> None:
        for attempt in range(3):  # a port taken between free_port() and bind is retried on another
            if not self._launched:
                with self._lock:
                    self._launch()
            self._launched = False
            if self._await_ready():
                self.ready.set()
                self.on_state("ready")
                return
            assert self.process is not None
            exited = self.process.poll() is not None
            with self._lock:
                self._terminate(1.0)
            if not exited or attempt == 2 or not self.start_again_on_exit:
                break
        if exited:
            code = None if self.process is None else self.process.returncode
            raise ServerFailed(f"{self.spec.name} exited with {code} during start; see {self.log_path}")
        raise ServerFailed(f"{self.spec.name} did not become ready in {self.start_timeout_s:.0f}s; see {self.log_path}")

    def _launch(self) -> None:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log_file is None:
            self._log_file = self.log_path.open("ab")
        announce(self.spec.name, self.port)
        self.process = _popen(self.spec.argv(self.port), self.spec.env, self._log_file)
        self._wake_when_exits(self.process)

    def _wake_when_exits(self, process: subprocess.Popen[bytes]) -> None:
        """Its exit wakes the watcher at once: a crash is restarted now, not at the next probe."""

        def wait() -> None:
            with contextlib.suppress(Exception):
                process.wait()
            self._wake.set()

        threading.Thread(target=wait, name="server-exit", daemon=True).start()

    def _await_ready(self) -> bool:
        """Ready means the readiness path answers 200 while the process is alive: mlx_lm.server stays
        up and answers 503 when its model failed to load."""
        deadline = time.monotonic() + self.start_timeout_s
        assert self.process is not None
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.process.poll() is not None:
                log.error("%s exited with %s during start", self.spec.name, self.process.returncode)
                self.on_state("exited")  # died loading (out of memory?), though it may be started again
                return False
            if self._answers():
                return True
            time.sleep(READY_POLL_S)
        return False

    def _answers(self, path: str | None = None) -> bool:
        return self._probe(path) == 200

    def _probe(self, path: str | None = None, *, port: int | None = None) -> int | None:
        """The status of one GET (200 only with a body), None when the server does not answer."""
        # http.client, not httpx: a probe runs every second for the worker's whole life, and this
        # costs a quarter of the CPU (0.09 against 0.33 ms measured here).
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=min(1.0, self.hang_timeout_s))
        try:
            conn.connect()
            conn.sock.settimeout(self.hang_timeout_s)
            conn.request("GET", path or self.spec.readiness_path)
            response = conn.getresponse()
            status = response.status if response.status != 200 or response.read() else 0
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        if status == 200:
            self._answered_at = time.monotonic()
        return status

    def _watch(self) -> None:
        backoff = 0.0
        silent_since: float | None = None
        while True:
            self._wake.wait(
                self.probe_interval_s if self._in_use or silent_since is not None else self.idle_probe_interval_s
            )
            self._wake.clear()
            if self._stopping.is_set():
                return
            assert self.process is not None
            died = self.process.poll() is not None
            refused, self._refused_by = self._refused_by == self.process.pid, None
            if not died and not refused:
                if self._answers(self.spec.liveness_path):
                    silent_since = None
                    backoff = 0.0
                    continue
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since < self.hang_timeout_s:
                    continue
            if self._stopping.is_set():
                return
            if died:
                reason = f"exited with {self.process.returncode}"
            else:
                reason = "refuses service (its liveness probe answers an error)" if refused else "stopped answering"
            log.warning("%s %s; restarting", self.spec.name, reason)
            self.ready.clear()
            self.on_state("down")
            with self._lock:
                self._terminate(0.5)
            if backoff:
                time.sleep(backoff)
            backoff = min(5.0, max(0.2, backoff * 2))  # a crash loop backs off instead of spinning
            silent_since = None
            try:
                self._launch_until_ready()
                self.on_state("restarted")
            except ServerFailed as error:
                log.error("restart failed: %s", error)

    def _terminate(self, grace_s: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=5)
