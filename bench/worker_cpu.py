"""CPU per job of genq's worker process and of its server, for plain and streamed jobs (issue #12).

`python -m bench.worker_cpu [--code DIR] [--label NAME] [--jobs N] [--rounds R] [--backend mlx|llamacpp]
[--env K=V]`: a private Redis, one `genq worker` (one process, concurrency 4) importing the code in
DIR (default: this tree; give an exported older commit to measure "before"), then rounds of N jobs
of 64 and of 4 tokens, plain and streamed, in a closed loop of 4 callers. CPU is read from
/proc/PID/stat (psutil), not wall time: the machine is shared, so each round is reported and the
spread between rounds is the noise. Results are appended to bench/results/worker_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.common import Lab, closed_loop, prompts
from bench.report import DEFAULT_RESULTS, Options
from producer import Client

CALLERS = 4


def cpu_s(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(kv.split("=", 1) for kv in args.env)
    if args.code:
        env["PYTHONPATH"] = args.code
    extra = ["--llama-server", args.llama_server] if args.backend == "llamacpp" else []
    out: dict[str, Any] = {"label": args.label, "backend": args.backend, "env": env, "rounds": []}
    with Lab(Options(keep_logs=False), "worker-cpu") as lab:
        settings = lab.settings()
        worker = lab.stack.start_worker(
            settings,
            backend=args.backend,
            processes=1,
            concurrency=CALLERS,
            env=env,
            extra_args=extra,
            shutdown_grace_s=5,
            cwd=args.code or None,  # `python -m` puts its folder first on sys.path, before PYTHONPATH
            wait=False,
            ready_timeout=300,
        )
        worker.wait_ready()
        [proc] = worker.worker_pids()
        [server] = worker.server_pids()
        with Client(settings) as client:

            def job(request: dict[str, Any]) -> int:
                result = client.generate(request, timeout=300)
                if not result.ok:
                    raise RuntimeError(result.error)
                return result.usage.completion_tokens

            for round_no in range(args.rounds):
                for max_tokens in (64, 4):
                    for kind in ("plain", "streamed"):
                        requests = [
                            {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0.0}
                            | ({"stream": True} if kind == "streamed" else {})
                            for p in prompts(args.jobs + 4, f"cpu{round_no}{kind}{max_tokens}")
                        ]
                        closed_loop(CALLERS, requests[:4], job)  # warm
                        before = (cpu_s([proc]), cpu_s([server]), time.monotonic())
                        tokens, _wall = closed_loop(CALLERS, requests[4:], job)
                        after = (cpu_s([proc]), cpu_s([server]), time.monotonic())
                        row = {
                            "round": round_no,
                            "max_tokens": max_tokens,
                            "kind": kind,
                            "jobs": args.jobs,
                            "tokens_per_job": sum(tokens) / len(tokens),
                            "worker_cpu_ms_per_job": 1000 * (after[0] - before[0]) / args.jobs,
                            "server_cpu_ms_per_job": 1000 * (after[1] - before[1]) / args.jobs,
                            "wall_s": after[2] - before[2],
                        }
                        print(json.dumps(row), flush=True)
                        out["rounds"].append(row)
    return out


def summarize(run: dict[str, Any]) -> list[str]:
    lines = []
    for max_tokens in (64, 4):
        for kind in ("plain", "streamed"):
            rows = [r for r in run["rounds"] if r["max_tokens"] == max_tokens and r["kind"] == kind]
            if not rows:
                continue
            w = [r["worker_cpu_ms_per_job"] for r in rows]
            s = [r["server_cpu_ms_per_job"] for r in rows]
            wall = [r["wall_s"] for r in rows]
            lines.append(
                f"| {run['label']} | {run['backend']} | {max_tokens} | {kind} | "
                f"{statistics.median(w):.1f} ({min(w):.1f}-{max(w):.1f}) | "
                f"{statistics.median(s):.1f} ({min(s):.1f}-{max(s):.1f}) | "
                f"{statistics.median(wall):.1f} | {len(rows)}x{rows[0]['jobs']} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_cpu")
    parser.add_argument("--code", help="PYTHONPATH for the worker (an exported commit)")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--backend", choices=["mlx", "llamacpp"], default="mlx")
    parser.add_argument("--llama-server", default=os.environ.get("GENQ_TEST_LLAMA_SERVER"))
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], help="K=V for the worker (and its server)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "worker_cpu.json")
    args = parser.parse_args(argv)
    run = measure(args)
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    runs.append(run)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    table = [
        "| code | backend | max_tokens | job | worker CPU ms/job, median (min-max) | "
        "server CPU ms/job | wall s/round | roundsxjobs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for each in runs:
        table += summarize(each)
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
