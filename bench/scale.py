"""Scale: a large batch through the producer (its peak RSS, its submit rate), what each queued job
costs in Redis memory, and throughput with 1, 2 and 4 worker processes.

The batch is a JSONL file streamed in chunks by a producer process of its own (bench.producer_load),
with no worker running, so every job stays queued and Redis's used memory grows by exactly what the
queued jobs take. Throughput runs in a fresh namespace per process count: the batch is submitted
at once to a ready worker and timed until its last result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_DIR, Lab, clean_env, prompts
from bench.report import Options, Report, num, pick
from jobcontract.models import GenerationRequest, Lane
from producer.client import Client

NAME = "scale"
RSS_TARGET_MB = 200.0


def run(options: Options) -> Report:
    size = options.size
    lines: int = pick(size, 2_000, 100_000, 1_000_000)
    jobs: int = pick(size, 40, 400, 2_000)
    process_counts: list[int] = pick(size, [1, 2], [1, 2, 4], [1, 2, 4])
    max_tokens: int = pick(size, 16, 32, 32)
    concurrency = 8
    report = Report(NAME, "Scale: a big batch, Redis memory per queued job, 1 to 4 worker processes", options)
    report.params = {
        "batch_lines": lines,
        "producer": "bench.producer_load: producer.Client.submit_many in chunks of 1000, keeping every job id",
        "throughput_jobs": jobs,
        "processes": process_counts,
        "concurrency_per_process": concurrency,
        "max_tokens": max_tokens,
        "lane": "batch",
    }
    with Lab(options, NAME) as lab:
        routes = lab.routes("mlx", [lab.mlx_route()])
        batch = _producer_run(lab, routes, lines, max_tokens)
        levels = [_throughput(lab, routes, p, jobs, concurrency, max_tokens) for p in process_counts]
    report.results = {"batch": batch, "throughput": levels}
    report.table(
        f"A {lines:,}-line batch, no worker running",
        [
            "producer peak RSS",
            "producer RSS before submitting",
            "submitted jobs/s",
            "Redis memory per queued job",
            "Redis used memory",
        ],
        [
            [
                f"{num(batch['peak_rss_mb'])} MB",
                f"{num(batch['peak_rss_before_submitting_mb'])} MB",
                num(batch["jobs_per_s"], 0),
                f"{num(batch['redis_bytes_per_job'], 0)} B",
                f"{num(batch['redis_used_after_mb'])} MB",
            ]
        ],
    )
    base = levels[0]["tokens_per_s"]
    report.table(
        f"Throughput: {jobs} batch jobs of {max_tokens} tokens submitted at once, {concurrency} slots per process",
        ["worker processes", "jobs/s", "tokens/s", "vs 1 process", "ready after"],
        [
            [
                str(level["processes"]),
                num(level["jobs_per_s"], 1),
                num(level["tokens_per_s"], 0),
                num(level["tokens_per_s"] / base, 2),
                f"{num(level['ready_s'], 1)} s",
            ]
            for level in levels
        ],
    )
    report.target("producer peak RSS", f"< {RSS_TARGET_MB:.0f} MB", batch["peak_rss_mb"], "MB", lambda v: v < 200)
    report.notes.append(
        "Each worker process owns an mlx_lm.server that wants the CPU: with more processes than cores, "
        "more processes cannot add throughput; on Apple Silicon each server gets the GPU's share."
    )
    return report


def _producer_run(lab: Lab, routes: Path, lines: int, max_tokens: int) -> dict[str, Any]:
    path = lab.run_dir / "batch.jsonl"
    with path.open("w") as out:
        for text in prompts(lines, "batch"):
            out.write(json.dumps({"model": "tiny", "prompt": text, "max_tokens": max_tokens, "lane": "batch"}) + "\n")
    settings = lab.settings(routes_file=routes)
    client = lab.client()
    client.execute_command("MEMORY", "PURGE")
    before = int(client.info("memory")["used_memory"])
    argv = [sys.executable, "-m", "bench.producer_load", str(path), "--redis-url", lab.url]
    argv += ["--namespace", settings.namespace, "--routes-file", str(routes), "--models-dir", str(lab.models_dir)]
    done = subprocess.run(argv, cwd=REPO_DIR, env=clean_env({}), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the producer failed:\n{done.stderr[-3000:]}")
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    after = int(client.info("memory")["used_memory"])
    measured |= {
        "redis_used_before_mb": before / 2**20,
        "redis_used_after_mb": after / 2**20,
        "redis_bytes_per_job": (after - before) / max(1, measured["jobs"]),
        "file_mb": path.stat().st_size / 2**20,
    }
    client.flushdb()
    path.unlink()
    return measured


def _throughput(lab: Lab, routes: Path, processes: int, jobs: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    settings = lab.settings(routes_file=routes)
    worker = lab.start_worker(settings, processes=processes, concurrency=concurrency, wait=False)
    ready = worker.wait_ready()
    requests = [
        GenerationRequest(model="tiny", prompt=p, max_tokens=max_tokens, temperature=0.0, lane=Lane.BATCH)
        for p in prompts(jobs, f"p{processes}")
    ]
    with Client(settings) as client:
        warm = client.results(client.submit_many(requests[: 2 * processes * concurrency]), timeout=600)
        if not all(r.ok for r in warm):
            raise RuntimeError("warm-up jobs failed")
        started = time.perf_counter()
        results = client.results(client.submit_many(requests), timeout=3600)
        wall = time.perf_counter() - started
    lab.stop_worker(worker)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {jobs} jobs failed: {failed[0].error}")
    tokens = sum(r.usage.completion_tokens for r in results)
    workers_used = len({r.worker for r in results})
    return {
        "processes": processes,
        "jobs": jobs,
        "tokens": tokens,
        "wall_s": wall,
        "jobs_per_s": jobs / wall,
        "tokens_per_s": tokens / wall,
        "ready_s": ready,
        "processes_that_served": workers_used,
    }
