"""A real Redis Sentinel deployment for tests: one master, replicas and three sentinels (Debian's
`redis-sentinel`), each on a free loopback port (never 6379/26379), failing over within seconds.

Everything it starts is stopped by `stop()` (and by leaving the `with` block), also when starting
failed half-way.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from genq.local_redis import _free_port

SERVICE = "genqmaster"


class SentinelCluster:
    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 2500,
        failover_timeout_ms: int = 3000,
        sentinel_password: str | None = None,
    ) -> None:
        self.server_binary = _binary("redis-server")
        self.sentinel_binary = _binary("redis-sentinel")
        self.dir = Path(tempfile.mkdtemp(prefix="genq-sentinel-"))
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_password = sentinel_password
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}
        self.first_master = 0

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        extra = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"sentinel://{hosts}/{SERVICE}/0{extra}"

    def plain_url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def master_port(self) -> int | None:
        """Where the sentinels say the master is (the first that answers), None if none knows."""
        for port in self.sentinels:
            try:
                with self._sentinel(port) as client:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
                if address:
                    return int(address[1])
            except redis.RedisError:
                continue
        return None

    def role(self, port: int) -> str | None:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.3, socket_timeout=1) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return None

    def replicas_online(self, master: int) -> int:
        """Replicas done with their initial sync: a WAIT counts only those."""
        try:
            with redis.Redis(port=master, socket_connect_timeout=0.3, socket_timeout=1) as client:
                info = client.info("replication")
        except redis.RedisError:
            return 0
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Self:
        try:
            master = self.start_server(_free_port())
            self.first_master = master
            for _ in range(self.replica_count):
                self.start_server(_free_port(), replica_of=master)
            for _ in range(self.sentinel_count):
                self._start_sentinel(_free_port(), master)
            self.wait_settled(master, timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def start_server(self, port: int, *, replica_of: int | None = None) -> int:
        data = self.dir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        argv = [self.server_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(data), "--daemonize", "no", "--logfile", str(data / "redis.log")]
        argv += ["--repl-diskless-sync-delay", "0"]  # a replica in sync at once, not after 5 s
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self.role(port) is not None, 10, f"redis-server on {port} did not start")
        return port

    def _start_sentinel(self, port: int, master: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.dir}",
            f"logfile {self.dir / f'sentinel-{port}.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {master} 2",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        conf.write_text("\n".join(lines) + "\n")
        self.sentinels[port] = subprocess.Popen(
            [self.sentinel_binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait_settled(self, master: int, timeout: float) -> None:
        """Every sentinel sees `master` with all its replicas and every other sentinel."""
        replicas = len(self.servers) - 1

        def settled() -> bool:
            for port in self.sentinels:
                try:
                    with self._sentinel(port) as client:
                        state = client.sentinel_master(SERVICE)
                except redis.RedisError:
                    return False
                if (
                    int(state["port"]) != master
                    or int(state["num-slaves"]) < replicas
                    or int(state["num-other-sentinels"]) < len(self.sentinels) - 1
                    or "s_down" in str(state["flags"])
                ):
                    return False
            return self.role(master) == "master" and self.replicas_online(master) >= replicas

        _wait(settled, timeout, f"sentinels did not settle on master {master}")

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        assert port is not None and port in self.servers, "no master to kill"
        process = self.servers.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return port

    def stop_server(self, port: int) -> None:
        """SIGKILL the server on `port`, whatever its role."""
        process = self.servers.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def sentinel_client(self) -> redis.Redis:
        """A client of the first sentinel (SENTINEL FAILOVER and the like)."""
        return self._sentinel(next(iter(self.sentinels)))

    def wait_failover(self, old: int, timeout: float = 60) -> int:
        """The port of the master that replaced `old`, once it answers as one."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port is not None and port != old and self.role(port) == "master":
                found.append(port)
                return True
            return False

        _wait(promoted, timeout, f"no failover away from {old}")
        return found[-1]

    def rejoin(self, port: int, master: int, timeout: float = 60) -> None:
        """Restart a dead server as it would come back (as a master of nothing) and wait until the
        sentinels have turned it into a replica of `master`, in sync."""
        self.start_server(port)

        def replica() -> bool:
            try:
                with redis.Redis(port=port, socket_connect_timeout=0.3, socket_timeout=1) as client:
                    info = client.info("replication")
            except redis.RedisError:
                return False
            linked = info.get("role") == "slave" and info.get("master_link_status") == "up"
            return bool(linked and info.get("master_port") == master)

        _wait(replica, timeout, f"{port} did not come back as a replica of {master}")

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            if process.poll() is None:
                process.kill()
        for process in [*self.sentinels.values(), *self.servers.values()]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.sentinels.clear()
        self.servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.dir.glob("*.log"))
        )

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port,
            password=self.sentinel_password,
            socket_connect_timeout=0.3,
            socket_timeout=1,
            decode_responses=True,
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install {name})")
    return found


def _wait(predicate: object, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(0.1)
