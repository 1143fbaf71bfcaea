"""Where CPU and Redis commands go, by process: what the cost benchmarks (capacity, idle) read.

CPU is utime + stime from /proc/PID/stat (psutil), never wall time, so other load on a shared
machine is not counted (though it still slows the CPU it shares). Redis commands come from two
places: `INFO commandstats` deltas (the totals, exact) and `MONITOR` (each command with the client
port that sent it, mapped to the process owning that port, so a count says who sent it; a script
call is named by its file, from the SHA1 of genq's protocol scripts).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import psutil
from redis import Redis


def cpu_s(pids: Iterable[int]) -> float:
    """utime + stime of the processes (gone ones count 0), in seconds."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds of named groups of processes between `start` and `stop`."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.before = {name: cpu_s(pids) for name, pids in self.groups.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {name: cpu_s(pids) - self.before[name] for name, pids in self.groups.items()}
        return self.used


def commandstats(db: Redis) -> dict[str, int]:
    stats: dict[str, Any] = db.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def command_delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Commands sent between two readings, without the readings' own INFO."""
    out = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    out.pop("info", None)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def script_names() -> dict[str, str]:
    """SHA1 of every genq protocol script (as EVALSHA names it) to its file name."""
    from jobcontract import scripts

    names = {}
    for entry in resources.files("jobcontract.protocol").iterdir():
        if entry.name.endswith(".lua"):
            with contextlib.suppress(Exception):
                text = scripts.source("jobcontract.protocol", entry.name)
                names[hashlib.sha1(text.encode()).hexdigest()] = entry.name
    return names


def ports_of(pids: Iterable[int]) -> dict[int, int]:
    """Local TCP port -> pid, for every connection the processes hold."""
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.laddr:
                    out[conn.laddr.port] = pid
    return out


class CommandWatch:
    """`MONITOR` in a thread: every command sent while it runs, with the port of the client that sent it."""

    def __init__(self, url: str) -> None:
        self.db = Redis.from_url(url)
        self.seen: list[tuple[int, str]] = []  # (client port, "COMMAND" or "EVALSHA <script>")
        self._stop = threading.Event()
        self._scripts = script_names()
        self._thread = threading.Thread(target=self._read, name="monitor", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> CommandWatch:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.db.ping()  # wakes the reader, which then sees the flag
        self._thread.join(timeout=5)
        self.db.close()

    def _read(self) -> None:
        with self.db.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    entry = monitor.next_command()
                except Exception:
                    return
                if self._stop.is_set():
                    return
                if entry.get("client_type") == "lua":  # run by a script: counted as the script's call
                    continue
                self.seen.append((int(entry.get("client_port") or 0), self._name(str(entry.get("command", "")))))

    def _name(self, command: str) -> str:
        parts = command.split()
        if not parts:
            return "?"
        name = parts[0].upper()
        if name in ("EVALSHA", "EVALSHA_RO") and len(parts) > 1:
            return f"EVALSHA {self._scripts.get(parts[1].strip(chr(34)), parts[1][:8])}"
        return name

    def by_process(self, names: Mapping[int, str]) -> dict[str, Counter[str]]:
        """Commands seen, by the name of the process that sent them (`names`: port -> process name)."""
        out: dict[str, Counter[str]] = {}
        for port, command in self.seen:
            out.setdefault(names.get(port, "other"), Counter())[command] += 1
        return out
