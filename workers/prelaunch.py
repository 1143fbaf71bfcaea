"""Worker processes spawned before `genq worker` has read its settings, each launching the server
the same command line launched last time.

A worker is ready when its server is, and a server cannot be launched before the settings say which
model, flags and binary: reading them (pydantic, pydantic-settings, the routes) takes 0.3 s here.
So `genq worker` remembers each launch by its command line and working folder, and on the next start
spawns its processes with that launch at once (this module imports the standard library and
multiprocessing only). Nothing is taken on trust: once the settings are read, a process whose
launch is not exactly the one they make is told to stop its server and exit, and another is
spawned (workers.spawner.Spawner.adopt). A process learns its settings and name through a pipe;
every process is spawned this way, so the early path and the usual one are the same code.

The first start of a command line, and one whose settings changed, take the usual time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import stat
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

from workers import boot
from workers.servers.supervisor import Launch


@dataclass
class Spawned:
    """A worker process started with `launch` (None: it starts no server before its settings), waiting
    on `config` for its settings and name, or for None: stop."""

    process: SpawnProcess
    config: Connection
    ready: ProcessEvent
    vouched: ProcessEvent
    launch: Launch | None

    def configure(self, settings_json: str, name: str) -> None:
        """Give it its settings and name. One that died meanwhile (its server would not launch) is
        left to its supervisor, which sees it exit and starts another."""
        with contextlib.suppress(OSError):
            self.config.send((settings_json, name))
        self.config.close()

    def abort(self) -> None:
        """Stop it and its server: the settings want another launch."""
        with contextlib.suppress(OSError):
            self.config.send(None)
            self.config.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


def spawn(context: SpawnContext, launch: Launch | None) -> Spawned:
    """A worker process (workers.boot.main) that launches `launch` first thing, then waits for its
    settings: Spawned.configure or Spawned.abort."""
    ready, vouched = context.Event(), context.Event()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=boot.main, args=(receive, ready, launch, vouched), daemon=False)
    process.start()
    receive.close()  # the process holds its own end: its parent's death reaches it as end-of-file
    return Spawned(process, send, ready, vouched, launch)


def spawn_remembered(command: dict[str, Any]) -> list[Spawned]:
    """As many processes as the last run of `command` had, each launching its server as then; none
    when nothing is remembered (or it cannot be read)."""
    remembered = _read(command)
    if remembered is None:
        return []
    launch, processes = remembered
    context = multiprocessing.get_context("spawn")
    return [spawn(context, launch) for _ in range(processes)]


def remember(command: dict[str, Any], launch: Launch | None, processes: int) -> None:
    """What `command` launched, for its next start (best effort: a folder that cannot be written only
    costs the next start its head start)."""
    path = _path(command)
    data = {"launch": None if launch is None else launch.to_json(), "processes": processes}
    with contextlib.suppress(OSError):
        if path.exists() and json.loads(path.read_text()) == data:
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data))
        temporary.chmod(0o600)
        temporary.replace(path)


def _read(command: dict[str, Any]) -> tuple[Launch, int] | None:
    """The remembered launch, if its file is this user's and no one else may write it: a command from
    it runs before anything checks it."""
    path = _path(command)
    try:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        data = json.loads(path.read_text())
        if data.get("launch") is None:
            return None
        return Launch.from_json(data["launch"]), max(1, int(data["processes"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _path(command: dict[str, Any]) -> Path:
    """One file per command line (its parsed options) and working folder, under the user's cache."""
    key = json.dumps({"command": command, "cwd": os.getcwd()}, sort_keys=True, default=str)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "genq" / "launches" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
