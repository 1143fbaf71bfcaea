"""Helpers for the callers' tests: a real `genq gateway` subprocess on a free port, `genq batch`
subprocesses, batch files, and a look at the job records a test left in Redis."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from genq.processes import spawn
from genq.worker_env import worker_env
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def genq_env(settings: GenqSettings, **extra: str) -> dict[str, str]:
    """The local stack's one rule: no GENQ_ variable from this shell, the settings written out."""
    return worker_env(settings, extra)


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, *, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(
    settings: GenqSettings,
    log_dir: Path,
    *,
    port: int | None = None,
    argv: list[str] | None = None,
    **env: str,
) -> Gateway:
    """`genq gateway` (or `argv`) on a free port, ready when /openapi.json (which needs no key) answers."""
    port = port or free_port()
    log_path = log_dir / f"gateway-{port}-{time.monotonic_ns()}.log"
    command = argv or [sys.executable, "-m", "genq", "gateway"]
    process = spawn([*command, "--port", str(port)], env=genq_env(settings, **env), log_path=log_path)
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


def batch_line(custom_id: str, *, chat: bool = False, max_tokens: int = 16, **body: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, **body}
    if chat:
        payload["messages"] = [{"role": "user", "content": f"say {custom_id}"}]
    else:
        payload.setdefault("prompt", f"line {custom_id}")
    url = "/v1/chat/completions" if chat else "/v1/completions"
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": payload}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with path.open("w") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_keys(client: redis.Redis, keys: Keys) -> set[bytes]:
    """Every job record of the namespace (not the per-job event streams)."""
    return {k for k in client.scan_iter(f"{keys.namespace}:job:*") if not k.endswith(b":events")}


def job_starts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """How many times a worker began each job: 1 for a job generated once, 0 for one never run."""
    starts = {}
    for key in job_keys(client, keys):
        starts[key.decode().rsplit(":", 1)[1]] = int(client.hget(key, "starts") or 0)
    return starts


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met after {timeout}s")
        time.sleep(interval)
