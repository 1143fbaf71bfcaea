"""Short-job capacity and CPU per job by process: the C++ llama-server called directly, through the
Python client, and through the gateway, in one run.

One `genq worker` (llama-server, 32 slots) and one `genq gateway` run on a private Redis. Each round
sends a block of jobs from 32 callers in a closed loop down each path in turn (the order rotates from
round to round, so load drifting on a shared machine hits every path alike):

- direct: the worker's own llama-server, as an application without genq would call it (HTTP/1.1
  kept alive, a plain completion);
- client: `producer.Client.generate` (submit, then wait for the result), in this process;
- gateway: `POST /v1/completions` to `genq gateway`.

jobs/s of each path is compared with direct in the same round (the ratio's median over rounds is the
figure). During each block the CPU of every process involved is read from /proc (utime + stime):
the caller (this process: the HTTP client for direct and gateway, the Python client itself for
client), the gateway, the genq worker (its supervisor and worker process), redis-server and
llama-server; divided by the jobs it is the CPU per job of each.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.accounting import CpuMeter
from bench.common import Lab, prompts
from bench.failover import find_llama_server
from bench.gateway_cost import start_gateway
from bench.report import Options, Report, llama_server_version, num, pick
from genq.processes import stop as stop_process
from producer.client import Client

NAME = "capacity"
CONCURRENCY = 32
RATIO_TARGET = 0.9
CPU_TARGETS_MS = {4: 3.0, 64: 5.0}
PATHS = ("direct", "client", "gateway")
PROCESSES = ("caller", "gateway", "genq worker", "redis-server", "llama-server")


def run(options: Options) -> Report:
    size = options.size
    rounds: int = pick(size, 1, 5, 9)
    jobs_short: int = pick(size, 40, 400, 800)
    jobs_long: int = pick(size, 16, 128, 256)
    binary = find_llama_server(options.llama_server)
    if binary is None:
        raise RuntimeError("capacity needs the C++ llama-server: pass --llama-server or set GENQ_LLAMA_SERVER_BIN")
    report = Report(NAME, "Short-job capacity and CPU per job: llama-server direct, Python client, gateway", options)
    report.params = {
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "jobs_per_block": {"4": jobs_short, "64": jobs_long},
        "llama_server": binary,
        "llama_server_version": llama_server_version(binary),
        "worker": {"processes": 1, "concurrency": CONCURRENCY},
    }
    blocks: list[dict[str, Any]] = []
    with Lab(options, NAME) as lab:
        routes = lab.routes(
            "llama",
            [
                {
                    "path": str(lab.gguf_model),
                    "first_token_timeout_s": 120.0,
                    "token_timeout_s": 120.0,
                    "context_length": 256,
                }
            ],
        )
        settings = lab.settings(routes_file=routes)
        worker = lab.start_worker(
            settings, backend="llamacpp", concurrency=CONCURRENCY, env={"GENQ_LLAMA_SERVER_BIN": binary}
        )
        gateway, gateway_url = start_gateway(settings, lab.run_dir, None, False)
        lab.closers.append(lambda: _stop(gateway))
        [server_url] = worker.server_urls()
        assert lab.redis.process is not None
        groups = {
            "caller": [os.getpid()],
            "gateway": [gateway.pid],
            "genq worker": [worker.pid, *worker.worker_pids()],
            "redis-server": [lab.redis.process.pid],
            "llama-server": worker.server_pids(),
        }
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        with (
            httpx.Client(base_url=server_url, limits=limits, timeout=120) as direct_http,
            httpx.Client(base_url=gateway_url, limits=limits, timeout=120) as gateway_http,
            Client(settings) as client,
            ThreadPoolExecutor(max_workers=CONCURRENCY) as pool,
        ):
            calls = _paths(direct_http, gateway_http, client)
            for max_tokens in (4, 64):  # every path warm: connections, the server's slots, the scripts
                for path in PATHS:
                    list(pool.map(lambda p, c=calls[path], n=max_tokens: c(p, n), prompts(CONCURRENCY, f"warm-{path}")))
            for r in range(rounds):
                order = PATHS[r % 3 :] + PATHS[: r % 3]
                for max_tokens, jobs in ((4, jobs_short), (64, jobs_long)):
                    for path in order:
                        texts = prompts(jobs, f"r{r}-{path}-{max_tokens}-{uuid.uuid4().hex[:4]}")
                        blocks.append(
                            _block(pool, groups, calls[path], texts, max_tokens)
                            | {
                                "round": r,
                                "path": path,
                                "max_tokens": max_tokens,
                            }
                        )
    report.results = {"blocks": blocks, "summary": _summary(blocks)}
    _tables(report, report.results["summary"], rounds)
    return report


def _paths(direct: httpx.Client, gateway: httpx.Client, client: Client) -> dict[str, Callable[[str, int], int]]:
    def via_direct(prompt: str, max_tokens: int) -> int:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.0}
        response = direct.post("/v1/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    def via_client(prompt: str, max_tokens: int) -> int:
        result = client.generate({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
        if not result.ok:
            raise RuntimeError(f"job {result.job_id} {result.state.value}: {result.error}")
        return result.usage.completion_tokens

    def via_gateway(prompt: str, max_tokens: int) -> int:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        response = gateway.post("/v1/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    return {"direct": via_direct, "client": via_client, "gateway": via_gateway}


def _block(
    pool: ThreadPoolExecutor,
    groups: dict[str, list[int]],
    call: Callable[[str, int], int],
    texts: list[str],
    max_tokens: int,
) -> dict[str, Any]:
    meter = CpuMeter(groups).start()
    started = time.perf_counter()
    tokens = list(pool.map(lambda text: call(text, max_tokens), texts))
    wall = time.perf_counter() - started
    used = meter.stop()
    return {
        "jobs": len(texts),
        "tokens": sum(tokens),
        "wall_s": wall,
        "jobs_per_s": len(texts) / wall,
        "cpu_ms_per_job": {name: 1000 * seconds / len(texts) for name, seconds in used.items()},
    }


def _summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per job size and path: medians over rounds of jobs/s, of the ratio to direct in the same round,
    and of each process's CPU per job."""
    out: dict[str, Any] = {}
    for max_tokens in (4, 64):
        sized = [b for b in blocks if b["max_tokens"] == max_tokens]
        direct = {b["round"]: b["jobs_per_s"] for b in sized if b["path"] == "direct"}
        entry: dict[str, Any] = {}
        for path in PATHS:
            mine = [b for b in sized if b["path"] == path]
            ratios = [b["jobs_per_s"] / direct[b["round"]] for b in mine]
            cpu = {name: statistics.median(b["cpu_ms_per_job"][name] for b in mine) for name in PROCESSES}
            own = cpu["genq worker"] + cpu["redis-server"] + (cpu["caller"] if path == "client" else cpu["gateway"])
            entry[path] = {
                "jobs_per_s": statistics.median(b["jobs_per_s"] for b in mine),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "tokens_per_job": sum(b["tokens"] for b in mine) / sum(b["jobs"] for b in mine),
                "cpu_ms_per_job": cpu,
                "genq_cpu_ms_per_job": own if path != "direct" else None,
            }
        out[str(max_tokens)] = entry
    return out


def _tables(report: Report, summary: dict[str, Any], rounds: int) -> None:
    rows = []
    for max_tokens in ("4", "64"):
        for path in PATHS:
            s = summary[max_tokens][path]
            ratio = "1" if path == "direct" else f"{s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
            rows.append([max_tokens, path, num(s["jobs_per_s"], 1), ratio, num(s["tokens_per_job"], 1)])
    report.table(
        f"Capacity at concurrency {CONCURRENCY}, jobs/s (median of {rounds} alternating round(s))",
        ["tokens", "path", "jobs/s", "ratio to direct, median (min-max of rounds)", "tokens/job"],
        rows,
    )
    cpu_rows = []
    for max_tokens in ("4", "64"):
        for path in PATHS:
            s = summary[max_tokens][path]
            cells = [
                num(s["cpu_ms_per_job"][name], 2) if (name != "gateway" or path == "gateway") else "-"
                for name in PROCESSES
            ]
            cpu_rows.append([max_tokens, path, *cells, num(s["genq_cpu_ms_per_job"], 2)])
    report.table(
        "CPU per job by process, ms (median of rounds; /proc utime+stime)",
        ["tokens", "path", "caller", "gateway", "genq worker", "redis-server", "llama-server", "genq's own"],
        cpu_rows,
    )
    for path in ("client", "gateway"):
        report.target(
            f"4-token jobs/s, {path}/direct",
            f">= {RATIO_TARGET}",
            summary["4"][path]["ratio"],
            "",
            lambda v: v >= RATIO_TARGET,
        )
    for tokens, limit in CPU_TARGETS_MS.items():
        for path in ("client", "gateway"):
            report.target(
                f"genq CPU per {tokens}-token job, {path} path",
                f"<= {limit} ms",
                summary[str(tokens)][path]["genq_cpu_ms_per_job"],
                "ms",
                _at_most(limit),
            )
    report.notes += [
        "genq's own = the genq worker (supervisor and worker process) + redis-server + the Python client "
        "(the caller's whole CPU on the client path, so it includes this benchmark's thread pool) or the gateway.",
        "The caller on the direct and gateway paths is an httpx client in this process, 32 threads.",
        "CPU is counted in 10 ms clock ticks: a block of N jobs resolves 10/N ms per job and process.",
    ]


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout_s=10)
