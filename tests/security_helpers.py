"""Helpers of the security and fuzzing tests: a private redis-server that wants a password (an ACL
user, and `requirepass` for the default user), and `genq gateway` subprocesses with API keys, which
are ready once their public OpenAPI spec answers (every other path wants a key)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from genq.local_redis import LocalRedis
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, free_port, genq_env


@dataclass(frozen=True)
class LockedRedis:
    server: LocalRedis
    user: str
    password: str  # the ACL user's
    default_password: str  # `requirepass`: the default user's

    @property
    def url(self) -> str:
        return f"redis://{self.user}:{self.password}@127.0.0.1:{self.server.port}/0"

    @property
    def secrets(self) -> tuple[str, str]:
        return self.password, self.default_password


def lock(server: LocalRedis, user: str = "genq") -> LockedRedis:
    """Give a running private redis-server an ACL user and a default-user password."""
    locked = LockedRedis(server, user, f"acl-{secrets.token_hex(12)}", f"req-{secrets.token_hex(12)}")
    client = redis.Redis(port=server.port)
    try:
        client.execute_command("ACL", "SETUSER", user, "on", f">{locked.password}", "~*", "&*", "+@all")
        client.config_set("requirepass", locked.default_password)
    finally:
        client.close()
    return locked


def start_gateway_process(
    settings: GenqSettings, log_dir: Path, env: dict[str, str], *, argv: list[str] | None = None
) -> Gateway:
    """`genq gateway` (or `argv`) on a free port with these GENQ_ variables, ready when
    /openapi.json answers."""
    port = free_port()
    log_path = log_dir / f"gateway-{port}-{time.monotonic_ns()}.log"
    command = argv or [sys.executable, "-m", "genq", "gateway"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            env=genq_env(settings, **env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    gateway = Gateway(process, port, log_path)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log()}")
        try:
            if httpx.get(f"{gateway.url}/openapi.json", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            gateway.stop(kill=True)
            raise TimeoutError(f"gateway not up after 30s:\n{gateway.log()}")
        time.sleep(0.1)
