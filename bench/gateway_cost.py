"""What the gateway costs per job, beside the Python client on the same stack: the gateway process's
CPU per 4-token job (utime + stime from /proc, so other load on the machine does not count), the
latency it adds over the Python client's p50, and the Redis commands per job (INFO commandstats
deltas).

    python -m bench.gateway_cost --label NAME [--jobs 200] [--rounds 3] [--extra-path DIR] [--keys]
    python -m bench.gateway_cost --summarize    # bench/results/gateway_cost.md from the JSON

In each round a short block of each path alone gives the command counts, then the two paths run
interleaved job by job (so drift on a busy machine hits both alike) for the CPU and latency figures;
each round's figures are kept so the spread shows how noisy a figure is. `--extra-path` is put in front of
the gateway's PYTHONPATH (to try optional packages without installing them into a shared venv);
`--keys` runs the gateway with an API key (the tenant path: quota slot and owner). Results are
appended to bench/results/gateway_cost.json under the label; `--summarize` pools the rounds of the
labels that differ only in a `-N` suffix (repeated runs of one configuration) into a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from bench.common import REPO_DIR, prompts
from genq.local_stack import LocalStack
from genq.processes import spawn
from genq.processes import stop as stop_process
from genq.worker_env import worker_env
from jobcontract.settings import GenqSettings
from producer.client import Client

RESULTS = REPO_DIR / "bench" / "results" / "gateway_cost.json"
TICKS = os.sysconf("SC_CLK_TCK")
KEY = "bench-key-0123456789"


def cpu_s(pid: int) -> float:
    """utime + stime of one process (the gateway runs in one), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def commands(db: Redis) -> dict[str, int]:
    stats: dict[str, Any] = db.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(after: dict[str, int], before: dict[str, int], jobs: int) -> dict[str, float]:
    out = {k: (v - before.get(k, 0)) / jobs for k, v in after.items() if v - before.get(k, 0) > 0}
    out.pop("info", None)
    return dict(sorted(out.items()))


def timed(call: Callable[[str], object], items: Sequence[str]) -> list[float]:
    latencies = []
    for item in items:
        started = time.perf_counter()
        call(item)
        latencies.append(time.perf_counter() - started)
    return latencies


def start_gateway(settings: GenqSettings, log_dir: Path, extra_path: str | None, keys: bool) -> tuple[Any, str]:
    port = _free_port()
    env = worker_env(settings, {"GENQ_GATEWAY_API_KEYS": KEY} if keys else {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO_DIR), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "genq", "gateway", "--port", str(port)]
    process = spawn(argv, env=env, log_path=log_dir / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((log_dir / "gateway.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_process(process, timeout_s=10)
    raise RuntimeError("gateway did not start")


def _native(pid: int) -> list[str]:
    """Which of the optional fast parsers the gateway process has loaded (from its memory map)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name in ("uvloop", "httptools", "hiredis", "orjson") if f"/{name}/" in maps]


def _spy(binary: str, pid: int, label: str) -> subprocess.Popen[bytes]:
    """py-spy on the gateway, as collapsed stacks in bench/results/ (idle threads left out)."""
    out = RESULTS.parent / f"gateway_cost-{label}.collapsed"
    argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", str(out), "--gil"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def summarize() -> str:
    """One row per configuration: medians and the spread (min-max) over all its rounds."""
    runs: dict[str, dict[str, Any]] = json.loads(RESULTS.read_text())
    pooled: dict[str, list[dict[str, Any]]] = {}
    for label, run in runs.items():
        base, _, suffix = label.rpartition("-")
        pooled.setdefault(base if suffix.isdigit() else label, []).extend(run["rounds"])
    figures = ("gateway_cpu_ms_per_job", "paired_added_p50_ms", "direct_p50_ms", "client_cpu_ms_per_job")
    lines = [
        "# Gateway cost per 4-token job (`python -m bench.gateway_cost`)",
        "",
        "Median over all rounds of the configuration, [min-max] of the rounds. CPU from /proc (utime+stime).",
        "",
        "| configuration | rounds | " + " | ".join(f.replace("_", " ") for f in figures) + " |",
        "| --- | --- |" + " --- |" * len(figures),
    ]
    for name, rows in pooled.items():
        cells = []
        for f in figures:
            values = [r[f] for r in rows if f in r]
            cells.append(f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]" if values else "-")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_cost")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--label")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra-path")
    parser.add_argument("--keys", action="store_true")
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--py-spy", help="py-spy binary: record the gateway during the rounds (collapsed stacks)")
    args = parser.parse_args(argv)
    if args.summarize:
        RESULTS.with_suffix(".md").write_text(summarize())
        return 0
    if not args.label:
        parser.error("--label is required")
    rounds: list[dict[str, Any]] = []
    with LocalStack() as stack:
        settings = stack.settings(namespace=f"gc{uuid.uuid4().hex[:8]}")
        stack.start_worker(settings, backend=args.backend, concurrency=1)
        process, url = start_gateway(settings, stack.run_dir, args.extra_path, args.keys)
        headers = {"Authorization": f"Bearer {KEY}"} if args.keys else {}
        db = Redis.from_url(settings.redis_url)
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http, Client(settings) as client:

                def via_gateway(prompt: str) -> None:
                    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0.0}
                    response = http.post("/v1/completions", json=body)
                    response.raise_for_status()

                def direct(prompt: str) -> None:
                    job_id = client.submit({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0.0})
                    client.result(job_id, timeout=60)

                timed(via_gateway, prompts(20, "warm-g"))
                timed(direct, prompts(20, "warm-d"))
                spy = _spy(args.py_spy, process.pid, args.label) if args.py_spy else None
                for r in range(args.rounds):
                    # Commands: a block of each alone, so the deltas are one path's.
                    count = min(args.jobs, 50)
                    cmd0 = commands(db)
                    timed(via_gateway, prompts(count, f"cg{r}"))
                    cmd1 = commands(db)
                    timed(direct, prompts(count, f"cd{r}"))
                    cmd2 = commands(db)
                    # CPU and latency: the two paths interleaved job by job, so drift hits both alike.
                    gateway_lat, direct_lat, own = [], [], 0.0
                    cpu0 = cpu_s(process.pid)
                    for i, (g, d) in enumerate(
                        zip(prompts(args.jobs, f"g{r}"), prompts(args.jobs, f"d{r}"), strict=True)
                    ):
                        for path in ((g, None), (None, d)) if i % 2 else ((None, d), (g, None)):
                            if path[0] is not None:
                                gateway_lat += timed(via_gateway, [path[0]])
                            else:
                                own0 = time.process_time()
                                direct_lat += timed(direct, [path[1] or ""])
                                own += time.process_time() - own0
                    cpu1 = cpu_s(process.pid)
                    paired = [g - d for g, d in zip(gateway_lat, direct_lat, strict=True)]
                    rounds.append(
                        {
                            "gateway_cpu_ms_per_job": (cpu1 - cpu0) * 1000 / args.jobs,
                            "client_cpu_ms_per_job": own * 1000 / args.jobs,
                            "gateway_p50_ms": statistics.median(gateway_lat) * 1000,
                            "direct_p50_ms": statistics.median(direct_lat) * 1000,
                            "added_p50_ms": (statistics.median(gateway_lat) - statistics.median(direct_lat)) * 1000,
                            "paired_added_p50_ms": statistics.median(paired) * 1000,
                            "gateway_commands_per_job": delta(cmd1, cmd0, count),
                            "direct_commands_per_job": delta(cmd2, cmd1, count),
                        }
                    )
                    print(json.dumps({"round": r, **{k: v for k, v in rounds[-1].items() if "commands" not in k}}))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
            native = _native(process.pid)
        finally:
            db.close()
            stop_process(process, timeout_s=10)
    summary = {
        "label": args.label,
        "jobs_per_block": args.jobs,
        "keys": args.keys,
        "extra_path": bool(args.extra_path),
        "load_1m": os.getloadavg()[0],
        "gateway_loaded": native,
        "rounds": rounds,
        **{
            f"median_{k}": statistics.median(r[k] for r in rounds)
            for k in (
                "gateway_cpu_ms_per_job",
                "client_cpu_ms_per_job",
                "added_p50_ms",
                "paired_added_p50_ms",
                "direct_p50_ms",
            )
        },
        "gateway_commands_per_job": rounds[-1]["gateway_commands_per_job"],
        "direct_commands_per_job": rounds[-1]["direct_commands_per_job"],
    }
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.label] = summary
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
