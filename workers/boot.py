"""A worker process's first moments: its server is started before the worker stack is imported.

The supervisor spawns each worker process (workers.prelaunch.spawn) with `main` as its target and the
server's command as plain data (workers.servers.supervisor.Launch); the settings and the process's
name follow through a pipe, so a process can be spawned, and its server launched, before the
supervisor has read its settings. Loading a model takes seconds, and importing the worker stack
(pydantic, redis, dramatiq, the runner) most of a second on a small machine: started first, the
server loads while the process imports, instead of after. So this module imports nothing but the
standard library and the server supervisor (itself standard library only) before the server runs;
workers.process, imported afterwards, does the rest.

Only a single-model worker (`--model`) is given a command to start: its one server is always loaded.
A multi-model worker (`--models`) starts its servers on demand, when a job needs a model
(workers.models.manager.ModelSet), so it starts none here and loads nothing before its first job.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from workers.servers.supervisor import Launch, Launched, announce


def main(config: Connection, ready: Any = None, launch: Launch | None = None, vouched: Any = None) -> None:
    """Entry point of a spawned worker process (workers.prelaunch.spawn): launch the server, then wait
    on `config` for the settings and this process's name (None, or its parent's end closing: stop the
    server, exit). `ready` is set once it serves, and it reads no queue before its supervisor sets
    `vouched`. With no `launch`, workers.process starts the server (or the models, on demand)."""
    _lead_own_group_and_follow_parent()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    launched = launch.start() if launch is not None else None
    try:
        told = config.recv()
    except (EOFError, OSError):
        told = None
    if told is None:  # another launch was wanted, or the supervisor is gone
        _kill(launched)
        return
    settings_json, consumer_name = told
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {consumer_name} %(levelname)s %(name)s: %(message)s"
    )
    if launch is not None and launched is not None:
        announce(launch.name, launched.port)
    try:
        _skip_httpx_command_line()
        from workers.process import serve
        from workers.settings import WorkerSettings

        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        settings = WorkerSettings.model_validate_json(settings_json)
    except BaseException:
        _kill(launched)
        raise
    on_ready = ready.set if ready is not None else None
    sys.exit(serve(settings, consumer_name, stop, on_ready=on_ready, launched=launched, vouched=vouched))


def _skip_httpx_command_line() -> None:
    """`import httpx` imports its command-line client (rich, pygments) when they are installed: a
    third of the worker stack's import time here, taken from the model loading beside it. httpx falls
    back to a stub when that import fails, which a None in sys.modules makes it do; a worker process
    never runs httpx's command line."""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def _kill(launched: Launched | None) -> None:
    if launched is not None:
        with contextlib.suppress(ProcessLookupError):
            launched.process.kill()
        launched.process.wait()


def _lead_own_group_and_follow_parent() -> None:
    """Own process group (the server joins it; the supervisor kills it whole if this process dies),
    and stop gracefully when the supervisor dies: the kernel tells us on Linux, a watcher elsewhere."""
    with contextlib.suppress(PermissionError):
        os.setpgid(0, 0)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the kernel was asked to tell us
            os.kill(os.getpid(), signal.SIGTERM)
        return  # the kernel tells us: no thread waking twice a second to look

    def watch_parent() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
