"""Several models on one worker: one mixed batch of jobs over three tiny models (built with three
seeds), served by one `genq worker --models` whose memory budget holds two of them, against the
same worker with a budget that holds all three (all resident). Counted: loads and swaps (the
worker's own metrics), tokens per second over the batch, and the servers' resident memory sampled
during the run against the budget.

The worker takes jobs in the order its consumer reads them (first come, first served, as llama-swap
serves requests); grouping jobs by model is the consumer's scheduler (issue #14, its other half),
so this measures the baseline it is to beat, and what a swap costs here.

`python -m bench.models [--size ci|small|full]` writes bench/results/models.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO_DIR, Lab
from bench.report import DEFAULT_RESULTS, Options, Report, Size, num, pick
from genq.local_worker import Worker
from genq.tiny_model import ensure_tiny_model
from jobcontract import protocol
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.protocol.placement import ReadModels, WorkerModels
from jobcontract.settings import GenqSettings
from producer.client import Client
from workers.servers.supervisor import free_port

NAME = "models"
MODELS = ("m0", "m1", "m2")
MAX_TOKENS = 8
GIB = 1024**3


def run(options: Options) -> Report:
    jobs: int = pick(options.size, 30, 300, 1000)
    report = Report(NAME, "Several models on one worker: a budget for two of three, against all resident", options)
    report.params = {"jobs": jobs, "models": list(MODELS), "max_tokens": MAX_TOKENS, "concurrency": 8}
    with Lab(options, NAME) as lab:
        routes = _routes(lab)
        order = _mixed(jobs)
        resident = _scenario(lab, routes, order, budget_bytes=4 * GIB)
        sizes = resident["sizes"]
        ordered = sorted(sizes.values())
        two = ordered[-1] + ordered[-2] + int(ordered[0] * 0.4)  # the two largest fit, all three do not
        swapping = _scenario(lab, routes, order, budget_bytes=two)
    report.results = {"all_resident": resident, "budget_for_two": swapping}
    rows = []
    for label, r in (("all three resident", resident), ("budget for two, first come first served", swapping)):
        rows.append(
            [
                label,
                num(r["budget_bytes"] / 2**20, 0),
                num(r["peak_servers_rss_bytes"] / 2**20, 0),
                str(r["loads"]),
                str(r["swaps"]),
                num(r["wall_s"], 2),
                num(r["tokens_per_s"], 0),
            ]
        )
    report.table(
        f"{jobs} jobs over {len(MODELS)} models, mixed at random, submitted at once",
        ["worker", "budget MB", "peak servers RSS MB", "loads", "swaps", "wall s", "tokens/s"],
        rows,
    )
    ratio = swapping["tokens_per_s"] / resident["tokens_per_s"] if resident["tokens_per_s"] else float("nan")
    report.target(
        "servers' memory within the budget (budget for two)",
        "<= 1.0 x budget",
        swapping["peak_servers_rss_bytes"] / swapping["budget_bytes"],
        "x",
        lambda v: v <= 1.0,
    )
    report.target(
        "tokens/s, budget for two vs all resident (first come first served)",
        ">= 0.9 (with grouping)",
        ratio,
        "x",
        lambda v: v >= 0.9,
    )
    report.notes.append(
        "Swaps are counted by the worker (genq_model_swaps_total): loads that first unloaded another model. "
        "Grouping by model (the scheduler) is not in this run: the ratio is first come first served's."
    )
    return report


def _routes(lab: Lab) -> Path:
    lines = []
    for seed, name in enumerate(MODELS):
        folder = lab.mlx_model if seed == 0 else ensure_tiny_model(lab.run_dir / name, seed=seed)[0]
        lines += [
            "[[models]]",
            f'name = "{name}"',
            "[[models.backends]]",
            f'path = "{folder}"',
            "first_token_timeout_s = 120.0",
            "token_timeout_s = 120.0",
            "context_length = 512",
            "",
        ]
    path = lab.run_dir / "routes-models.toml"
    path.write_text("\n".join(lines))
    return path


def _mixed(jobs: int) -> list[str]:
    """The same mixed order for every scenario: each model a third of the jobs, shuffled."""
    order = [MODELS[n % len(MODELS)] for n in range(jobs)]
    random.Random(14).shuffle(order)
    return order


def _scenario(lab: Lab, routes: Path, order: list[str], *, budget_bytes: int) -> dict[str, Any]:
    settings = lab.settings(routes_file=routes)
    port = free_port()
    extra = ["--models", ",".join(MODELS), "--memory-budget-gb", repr(budget_bytes / GIB)]
    extra += ["--metrics-port", str(port), "--keep-alive", "600"]
    worker = lab.stack.start_worker(
        settings, backend="mlx", concurrency=8, shutdown_grace_s=5, cwd=REPO_DIR, wait=False, extra_args=extra
    )
    try:
        _await_record(settings, worker)
        peak = _Peak(worker)
        peak.start()
        with Client(settings) as client:
            began = time.monotonic()
            ids: list[str] = []
            for start in range(0, len(order), 100):
                chunk = order[start : start + 100]
                ids += client.submit_many(
                    [
                        {"model": m, "prompt": f"job {start + i} of {m}", "max_tokens": MAX_TOKENS}
                        for i, m in enumerate(chunk)
                    ]
                )
            results = client.results(ids, timeout=1800)
            wall = time.monotonic() - began
        peak.stop()
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} job(s) failed, first: {failed[0]}")
        tokens = sum(r.usage.completion_tokens for r in results)
        counters = _scrape(port)
        record = _records(settings)[0]
        return {
            "budget_bytes": budget_bytes,
            "sizes": dict(record.sizes),
            "jobs": len(ids),
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "loads": int(counters.get("genq_model_loads_total", 0)),
            "swaps": int(counters.get("genq_model_swaps_total", 0)),
            "unloads": int(counters.get("genq_model_unloads_total", 0)),
            "peak_servers_rss_bytes": peak.peak,
            "loaded_at_end": list(record.loaded),
        }
    finally:
        lab.stop_worker(worker)


def _records(settings: GenqSettings) -> list[WorkerModels]:
    client = connect(settings.redis_url)
    try:
        return protocol.run(client, ReadModels(Keys(settings.namespace)))
    finally:
        client.close()


def _await_record(settings: GenqSettings, worker: Worker) -> None:
    deadline = time.monotonic() + 300
    while not _records(settings):
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker never published its models:\n{worker.log()}")
        time.sleep(0.1)


def _scrape(port: int) -> dict[str, float]:
    """Each counter summed over its labels (one worker process)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


class _Peak(threading.Thread):
    """The largest sum of the worker's servers' resident memory, sampled every 50 ms."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="rss-peak", daemon=True)
        self.worker = worker
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._done.wait(0.05):
            total = 0
            for pid in self.worker.server_pids():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("--size", choices=[s.value for s in Size], default="small")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    report = run(Options(size=Size(args.size), out_dir=args.out))
    json_path, md_path = report.write()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
