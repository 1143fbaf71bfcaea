"""Idle cost: what one `genq worker` with nothing to do costs the machine and Redis.

One worker (one process, the tiny model on mlx) is started on a private Redis and left alone; over a
window of seconds the benchmark reads the CPU of each of its processes from /proc (the supervisor,
the worker process, the server) and every Redis command sent, from `INFO commandstats` (the totals)
and `MONITOR` (who sent each: the client's port mapped to the process holding it). A fleet of idle
workers multiplies these figures, so they are what a quiet cluster costs its Redis.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from bench.accounting import CommandWatch, CpuMeter, command_delta, commandstats, ports_of
from bench.common import Lab
from bench.report import Options, Report, num, pick

NAME = "idle"
CPU_TARGET_MS_PER_S = 2.0
COMMANDS_TARGET_PER_S = 10.0


def run(options: Options) -> Report:
    window_s: float = pick(options.size, 3.0, 20.0, 60.0)
    settle_s: float = pick(options.size, 1.0, 3.0, 5.0)
    report = Report(NAME, "Idle cost: one genq worker with nothing to do", options)
    report.params = {"window_s": window_s, "settle_s": settle_s, "worker": {"processes": 1, "concurrency": 8}}
    with Lab(options, NAME) as lab:
        settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route()]))
        worker = lab.start_worker(settings, concurrency=8)
        time.sleep(settle_s)  # past the start: its first reads, the first vouches
        assert lab.redis.process is not None
        processes = {
            "supervisor": [worker.pid],
            "worker process": worker.worker_pids(),
            "server": worker.server_pids(),
            "redis-server": [lab.redis.process.pid],
        }
        db = lab.client()
        meter = CpuMeter(processes)
        named = {"supervisor": processes["supervisor"], "worker process": processes["worker process"]}
        named["benchmark"] = [os.getpid()]
        owners = {port: name for name, pids in named.items() for port in ports_of(pids)}
        before = commandstats(db)
        started = time.monotonic()
        meter.start()
        with CommandWatch(lab.url) as watch:
            time.sleep(window_s)
        used = meter.stop()
        elapsed = time.monotonic() - started
        after = commandstats(db)
        owners |= {port: name for name, pids in named.items() for port in ports_of(pids)}
        lab.stop_worker(worker)
    totals = command_delta(after, before)
    totals.pop("monitor", None)
    seen = watch.by_process(owners)
    seen.pop("benchmark", None)  # its own INFO and PING
    genq_ms = 1000 * (used["supervisor"] + used["worker process"]) / elapsed
    # Sent by the worker's processes (MONITOR); commandstats also counts the calls scripts make inside.
    per_s = sum(sum(counter.values()) for counter in seen.values()) / elapsed
    report.results = {
        "elapsed_s": elapsed,
        "cpu_ms_per_s": {name: 1000 * seconds / elapsed for name, seconds in used.items()},
        "genq_cpu_ms_per_s": genq_ms,
        "redis_commands_per_s": per_s,
        "commandstats_per_s": {name: count / elapsed for name, count in totals.items()},
        "commands_per_s_by_process": {
            process: {name: count / elapsed for name, count in counter.most_common()}
            for process, counter in seen.items()
        },
    }
    report.table(
        f"CPU of an idle worker, ms per second (over {elapsed:.0f} s)",
        ["supervisor", "worker process", "genq total", "its server", "redis-server"],
        [
            [
                num(1000 * used["supervisor"] / elapsed, 2),
                num(1000 * used["worker process"] / elapsed, 2),
                num(genq_ms, 2),
                num(1000 * used["server"] / elapsed, 2),
                num(1000 * used["redis-server"] / elapsed, 2),
            ]
        ],
    )
    report.table(
        "Redis commands per second, by the process that sent them (MONITOR)",
        ["process", "command", "per second"],
        _command_rows(seen, elapsed),
    )
    report.table(
        "Redis commands per second, all clients, scripts' inner calls included (INFO commandstats)",
        ["command", "per second"],
        [[name, num(count / elapsed, 2)] for name, count in totals.items()],
    )
    report.target(
        "idle worker CPU (supervisor + worker process)",
        f"<= {CPU_TARGET_MS_PER_S} ms/s",
        genq_ms,
        "ms/s",
        lambda v: v <= CPU_TARGET_MS_PER_S,
    )
    report.target(
        "Redis commands sent by an idle worker",
        f"<= {COMMANDS_TARGET_PER_S}/s",
        per_s,
        "/s",
        lambda v: v <= COMMANDS_TARGET_PER_S,
    )
    report.notes += [
        "CPU is utime+stime from /proc. Commands sent are MONITOR's (a script is one call; the client's "
        "port names the process; the benchmark's own INFO and PING left out); INFO commandstats also counts "
        "the calls each script makes inside Redis.",
        "CPU is counted in 10 ms clock ticks: over a short window a process's figure resolves 10 ms / window.",
    ]
    return report


def _command_rows(seen: dict[str, Counter[str]], elapsed: float) -> list[list[str]]:
    rows: list[list[str]] = []
    for process in sorted(seen):
        counter = seen[process]
        for command, count in counter.most_common():
            rows.append([process, command, num(count / elapsed, 2)])
        rows.append([process, "**all**", num(sum(counter.values()) / elapsed, 2)])
    return rows
