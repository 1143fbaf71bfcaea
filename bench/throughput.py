"""Throughput: N prompts through genq (one mlx worker) against the same N sent straight to the same
`mlx_lm.server`, at the same concurrency.

"The same server" is literal: the direct requests go to the worker's own server process, so both
sides share its flags, its warm state and its machine. Each level runs both sides in alternating
order for a few rounds, so drift in the machine's load hits both alike; every prompt is distinct,
so neither side gains from the server's prompt cache.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import psutil

from bench.common import DirectClient, Lab, WorkerProc, closed_loop, prompts
from bench.report import Options, Report, num, pick
from jobcontract.models import GenerationRequest
from producer.client import Client

NAME = "throughput"
TARGET_RATIO = 0.97  # issue #12 (0.95 was #7's)


def run(options: Options) -> Report:
    size = options.size
    levels: list[int] = pick(size, [1, 8], [1, 8, 32], [1, 8, 32])
    # Short blocks, many rounds: on a shared machine load drifts, and short alternating blocks share it fairly.
    jobs: dict[int, int] = pick(size, {1: 4, 8: 16}, {1: 8, 8: 32, 32: 96}, {1: 32, 8: 128, 32: 256})
    max_tokens: int = pick(size, 16, 64, 64)
    rounds: int = pick(size, 1, 6, 12)
    report = Report(NAME, "Throughput: genq vs the same mlx_lm.server called directly", options)
    report.params = {
        "concurrency": levels,
        "jobs_per_round": jobs,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "worker": {"processes": 1, "concurrency": max(levels)},
        "direct_client": "httpx, one POST /v1/completions per prompt to the worker's own server: plain, and "
        "streamed with usage (as a genq worker asks for it for a streamed job; an unstreamed job is plain)",
        "genq_client": "producer.Client.generate (submit, then block on the job's event stream) per prompt",
    }
    with Lab(options, NAME) as lab:
        # Three tries on the server, as the direct client gets: mlx_lm.server drops connections under bursts.
        settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route(max_attempts=3)]))
        worker = lab.start_worker(settings, concurrency=max(levels))
        [url] = worker.server_urls()
        model = str(lab.mlx_model)
        with Client(settings) as client, DirectClient(url, model, connections=max(levels) + 4) as http:

            def direct(prompt: str) -> int:
                return http.complete(prompt, max_tokens)[1]

            def direct_streamed(prompt: str) -> int:
                return http.complete(prompt, max_tokens, stream=True)[1]

            failed: list[str] = []  # a failed job counts, with no tokens: the caller would have to resubmit it

            def via_genq(prompt: str) -> int:
                request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
                result = client.generate(request, timeout=600)
                if not result.ok:
                    failed.append(f"{result.job_id}: {result.error.message if result.error else result.state.value}")
                    return 0
                return result.usage.completion_tokens

            sides = {"direct": direct, "genq": via_genq, "direct_streamed": direct_streamed}
            for side, call in sides.items():  # warm both paths: first requests pay for compilation
                closed_loop(max(levels), prompts(2 * max(levels), f"warm-{side}"), call)
            levels_out: list[dict[str, Any]] = []
            for level in levels:
                rounds_out: list[dict[str, Any]] = []
                for r in range(rounds):
                    names = list(sides)
                    order = names[r % len(names) :] + names[: r % len(names)]  # each side leads in turn
                    entry: dict[str, Any] = {"round": r, "order": order}
                    for side in order:
                        failed_before = len(failed)
                        cpu_before = cpu_by_part(worker, lab)
                        tokens, wall = closed_loop(level, prompts(jobs[level], f"{side}-{level}-{r}"), sides[side])
                        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_by_part(worker, lab).items()}
                        entry[side] = {"jobs": len(tokens), "tokens": sum(tokens), "wall_s": wall, "cpu_s": cpu}
                        entry[side]["failed"] = len(failed) - failed_before
                    rounds_out.append(entry)
                levels_out.append(_level_summary(level, rounds_out))
            direct_retries = http.retries
    report.results = {"levels": levels_out, "direct_retries": direct_retries, "genq_failed": failed}
    rows = []
    for summary in levels_out:
        d, g, s = summary["direct"], summary["genq"], summary["direct_streamed"]
        rows.append(
            [
                str(summary["concurrency"]),
                num(d["tokens_per_s"], 0),
                num(s["tokens_per_s"], 0),
                num(g["tokens_per_s"], 0),
                num(summary["ratio"], 3),
                num(summary["median_round_ratio"], 3),
                f"{num(min(summary['round_ratios']), 2)} to {num(max(summary['round_ratios']), 2)}",
                num(summary["ratio_to_streamed"], 3),
                num(d["jobs_per_s"], 1),
                num(g["jobs_per_s"], 1),
                str(g["failed"]),
            ]
        )
        report.target(
            f"genq/direct tokens/s at concurrency {summary['concurrency']}",
            f">= {TARGET_RATIO}",
            summary["median_round_ratio"],
            "",
            lambda v: v >= TARGET_RATIO,
        )
    report.table(
        f"Tokens/s and jobs/s, {max_tokens} tokens per job, pooled over {rounds} alternating round(s); "
        "the target is judged on the median of the rounds' ratios, which one disturbed round cannot move",
        [
            "concurrency",
            "direct tok/s",
            "direct streamed tok/s",
            "genq tok/s",
            "genq/direct",
            "median of rounds",
            "rounds range",
            "genq/direct streamed",
            "direct jobs/s",
            "genq jobs/s",
            "genq jobs failed",
        ],
        rows,
    )
    cpu_rows = []
    for summary in levels_out:
        for side in ("direct", "direct_streamed", "genq"):
            cpu = summary[side]["cpu_ms_per_job"]
            cpu_rows.append(
                [
                    str(summary["concurrency"]),
                    side,
                    *(num(cpu[k], 1) for k in ("server", "genq_worker", "redis", "caller")),
                ]
            )
    report.table(
        "CPU per job (ms): where the cores went, by process",
        ["concurrency", "side", "mlx_lm.server", "genq worker", "redis-server", "caller"],
        cpu_rows,
    )
    if failed:
        report.notes.append(
            f"{len(failed)} genq job(s) failed after their attempts and count with no tokens; first: {failed[0]}"
        )
    if direct_retries:
        report.notes.append(f"The direct client retried {direct_retries} request(s) on a dropped connection.")
    report.notes.append(
        "genq's jobs here are not streamed (Client.generate), so its worker asks the server for a plain "
        "completion, as 'direct' does; 'direct streamed' is what a streamed job's worker asks for."
    )
    report.notes.append(
        "Both sides share the machine with the benchmark's own client threads; on genq's side Redis and the "
        "worker process also run on the same cores as the server."
    )
    return report


def cpu_by_part(worker: WorkerProc, lab: Lab) -> dict[str, float]:
    """CPU seconds used so far by the server, genq's own worker processes, Redis and this caller:
    on a CPU-only machine whatever the others use is taken from generation."""
    servers = set(worker.server_pids())
    try:
        tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    assert lab.redis.process is not None
    parts = {
        "server": [p for p in tree if p.pid in servers],
        "genq_worker": [p for p in tree if p.pid not in servers],
        "redis": [psutil.Process(lab.redis.process.pid)],
        "caller": [psutil.Process(os.getpid())],
    }
    return {name: sum(_cpu(p) for p in processes) for name, processes in parts.items()}


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def _level_summary(level: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": level, "rounds": rounds}
    for side in ("direct", "genq", "direct_streamed"):
        jobs = sum(r[side]["jobs"] for r in rounds)
        tokens = sum(r[side]["tokens"] for r in rounds)
        wall = sum(r[side]["wall_s"] for r in rounds)
        out[side] = {
            "jobs": jobs,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "jobs_per_s": jobs / wall,
            "failed": sum(r[side]["failed"] for r in rounds),
            "cpu_ms_per_job": {
                part: 1000 * sum(r[side]["cpu_s"][part] for r in rounds) / jobs for part in rounds[0][side]["cpu_s"]
            },
        }
    out["ratio"] = out["genq"]["tokens_per_s"] / out["direct"]["tokens_per_s"]
    out["ratio_to_streamed"] = out["genq"]["tokens_per_s"] / out["direct_streamed"]["tokens_per_s"]
    out["round_ratios"] = [
        (r["genq"]["tokens"] / r["genq"]["wall_s"]) / (r["direct"]["tokens"] / r["direct"]["wall_s"]) for r in rounds
    ]
    out["median_round_ratio"] = statistics.median(out["round_ratios"])
    return out
