"""Several models on one worker: one mixed batch of jobs over three tiny models (built with three
seeds), served by one `genq worker --models` whose memory budget holds two of them, against the
same worker with a budget that holds all three (all resident). Counted: loads and swaps (the
worker's own metrics), tokens per second over the batch, the servers' resident memory sampled
during the run against the budget, and how long jobs waited to start (their results' timings).

The budget for two runs twice: with no swap bound (GENQ_MAX_SWAP_WAIT_S=0: the worker takes every
model's jobs as they come and swaps as soon as it holds jobs for a model it has not loaded), and
grouped by model (the scheduler, jobcontract.scheduling.plan: a job for a model the worker has not
loaded waits, while the loaded models have work, until it waited the swap bound). The bound is chosen
per size (SWAP_WAIT_S): see its comment. All resident runs twice too, with bound 0 (the baseline) and
with the grouped run's bound: a worker with room for every model needs no swap, so grouping should
cost it nothing.

First come first served (what llama-swap does: each request in arrival order, its model loaded when
it is not, the least recently used one unloaded when the budget is full) is replayed, not run: its
swaps are counted over the batch's order with the models' measured sizes and the same budget (a run
would spend minutes loading), and its wall time is estimated as the grouped run's plus one load (the
grouped run's mean) per extra swap, since in arrival order the jobs behind a swap wait for its load.

`python -m bench.models [--size ci|small|full] [--swap-wait S]` writes bench/results/models.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO_DIR, Lab
from bench.report import DEFAULT_RESULTS, Options, Report, Size, latency_ms, num, pick
from genq.local_worker import Worker
from genq.tiny_model import ensure_tiny_model
from jobcontract import protocol
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.models import GenerationResult
from jobcontract.protocol.placement import ReadModels, WorkerModels
from jobcontract.settings import GenqSettings
from producer.client import Client
from workers.servers.supervisor import free_port

NAME = "models"
MODELS = ("m0", "m1", "m2")
MAX_TOKENS = 8
GIB = 1024**3
# The swap bound for the grouped run, per size (ci, small, full). A tiny model loads in about 1.3 s
# here, and all resident serves 300 jobs in 7-15 s on this shared machine (2 cores, others' tests),
# so one model's third of the batch takes 2-5 s: 10 s at small lets the loaded models finish their
# share before the third model's jobs come of age (one swap for the batch), on a loaded machine too,
# while no job waits much longer than the bound. The default (30 s) is for real models whose load
# takes many seconds, and suits full's 1,000 jobs.
SWAP_WAIT_S = (3.0, 10.0, 30.0)
# Rounds of the four runs, in turn (ci, small, full): on a shared 2-core machine one run's tokens/s
# moves by a third with the others' load (a tiny model's load takes 2.5 s or 13 s), more than the
# effect measured, so each run's row is its median round and the ratios are of medians.
ROUNDS = (1, 3, 3)


def run(options: Options, swap_wait_s: float | None = None) -> Report:
    jobs: int = pick(options.size, 30, 300, 1000)
    bound = swap_wait_s if swap_wait_s is not None else pick(options.size, *SWAP_WAIT_S)
    report = Report(NAME, "Several models on one worker: a budget for two of three, against all resident", options)
    report.params = {
        "jobs": jobs,
        "models": list(MODELS),
        "max_tokens": MAX_TOKENS,
        "concurrency": 8,
        "max_swap_wait_s": bound,
        "rounds": pick(options.size, *ROUNDS),
    }
    runs: dict[str, list[dict[str, Any]]] = {"resident": [], "unbounded": [], "grouped": [], "resident_bound": []}
    two = 0
    with Lab(options, NAME) as lab:
        routes = _routes(lab)
        order = _mixed(jobs)
        for _ in range(report.params["rounds"]):
            runs["resident"].append(_scenario(lab, routes, order, budget_bytes=4 * GIB, swap_wait_s=0.0))
            if not two:
                ordered = sorted(runs["resident"][0]["sizes"].values())
                two = ordered[-1] + ordered[-2] + int(ordered[0] * 0.4)  # the two largest fit, all three do not
            runs["unbounded"].append(_scenario(lab, routes, order, budget_bytes=two, swap_wait_s=0.0))
            runs["grouped"].append(_scenario(lab, routes, order, budget_bytes=two, swap_wait_s=bound))
            # The same bound with room for all three: what grouping costs a worker that needs no swap.
            runs["resident_bound"].append(_scenario(lab, routes, order, budget_bytes=4 * GIB, swap_wait_s=bound))
    resident, unbounded, grouped, resident_bound = (_median(runs[k]) for k in runs)
    fcfs = _fcfs_replay(order, grouped, budget_bytes=two)
    report.results = {
        "all_resident": resident,
        "budget_for_two_no_bound": unbounded,
        "budget_for_two_grouped": grouped,
        "all_resident_with_bound": resident_bound,
        "budget_for_two_fcfs_replayed": fcfs,
        "tokens_per_s_by_round": {k: [r["tokens_per_s"] for r in v] for k, v in runs.items()},
    }
    scenarios = (
        ("all three resident (bound 0 s)", resident),
        ("budget for two, no swap bound (0 s)", unbounded),
        (f"budget for two, grouped by model (bound {bound:g} s)", grouped),
        (f"all three resident, bound {bound:g} s", resident_bound),
    )
    rows = []
    for label, r in scenarios:
        wait = r["queue_wait"]
        rows.append(
            [
                label,
                num(r["budget_bytes"] / 2**20, 0),
                num(r["peak_servers_rss_bytes"] / 2**20, 0),
                str(r["loads"]),
                str(r["swaps"]),
                num(r["wall_s"], 2),
                num(r["tokens_per_s"], 0),
                ", ".join(num(t, 0) for t in r["rounds_tokens_per_s"]),
                num(r["tokens_per_s"] / resident["tokens_per_s"], 2) + " x",
                num(wait["p95_ms"] / 1000, 1),
                num(wait["max_ms"] / 1000, 1),
                num(r["idle_while_waiting_s"], 1),
            ]
        )
    rows.append(
        [
            "budget for two, first come first served (replayed, as llama-swap)",
            num(two / 2**20, 0),
            "-",
            str(fcfs["loads"]),
            str(fcfs["swaps"]),
            num(fcfs["wall_s"], 2) + " (est.)",
            num(fcfs["tokens_per_s"], 0) + " (est.)",
            "-",
            num(fcfs["tokens_per_s"] / resident["tokens_per_s"], 2) + " x",
            "-",
            "-",
            "-",
        ]
    )
    report.table(
        f"{jobs} jobs over {len(MODELS)} models, mixed at random, submitted at once: each run's median round",
        [
            "worker",
            "budget MB",
            "peak servers RSS MB",
            "loads",
            "swaps",
            "wall s",
            "tokens/s",
            "tokens/s, each round",
            "vs all resident",
            "wait p95 s",
            "wait max s",
            "idle while jobs wait s",
        ],
        rows,
    )
    report.table(
        "Models loaded and unloaded, in order (+ load, - unload), seconds from the first submit",
        ["worker", "events"],
        [[label, r["events_text"]] for label, r in scenarios],
    )
    for label, key in (("no swap bound", "unbounded"), ("grouped", "grouped")):
        report.target(
            f"servers' memory within the budget (budget for two, {label}; every round)",
            "<= 1.0 x budget",
            max(r["peak_servers_rss_bytes"] for r in runs[key]) / two,
            "x",
            lambda v: v <= 1.0,
        )
    report.target(
        "swaps, grouped vs first come first served (replayed)",
        "<= 0.1 x",
        grouped["swaps"] / fcfs["swaps"] if fcfs["swaps"] else float("nan"),
        "x",
        lambda v: v <= 0.1,
    )
    report.target(
        "tokens/s, budget for two (grouped) vs all resident",
        ">= 0.9 x",
        grouped["tokens_per_s"] / resident["tokens_per_s"] if resident["tokens_per_s"] else float("nan"),
        "x",
        lambda v: v >= 0.9,
    )
    report.table(
        "Wait to start by model, seconds (started_at - enqueued_at): first job, p95, last job",
        ["worker", *MODELS],
        [[label, *(_waits(r["queue_wait_by_model"][m]) for m in MODELS)] for label, r in scenarios],
    )
    first_start = max(r["queue_wait_by_model"][m]["min_ms"] for r in runs["grouped"] for m in MODELS) / 1000
    slack = max((t for r in runs["grouped"] for t in r["load_s"]), default=0.0) + 1.0
    report.target(
        "every model's first job started within the bound, grouped, every round (nothing waits for ever)",
        f"<= bound + a load + 1 s ({bound:g} + {slack:.1f} s)",
        first_start,
        "s",
        lambda v: v <= bound + slack,
    )
    report.target(
        f"tokens/s, all resident with the bound ({bound:g} s) vs without (grouping costs no swap-free worker)",
        ">= 0.9 x",
        resident_bound["tokens_per_s"] / resident["tokens_per_s"] if resident["tokens_per_s"] else float("nan"),
        "x",
        lambda v: v >= 0.9,
    )
    report.notes += [
        f"Each run is repeated {report.params['rounds']} times, the four in turn; its row is its median round "
        "by tokens/s (every round's tokens/s beside it), and the ratios are of those medians: on this shared "
        "machine a tiny model's load takes 2.5 s to 13 s with the others' load, so one round of a run moves "
        "by a third.",
        "Swaps are counted by the worker (genq_model_swaps_total): loads that first unloaded another model.",
        "First come first served is replayed over the batch's order (see the module docstring): "
        f"{fcfs['swaps']} swaps in {fcfs['loads']} loads with the measured sizes and the budget for two; "
        f"its wall time is the grouped run's plus {fcfs['swaps'] - grouped['swaps']} loads of "
        f"{fcfs['mean_load_s']:.1f} s (the grouped run's mean). The worker with no swap bound is genq without "
        "grouping's bound: it swaps as soon as it holds another model's jobs, yet runs the jobs it holds "
        "for a model before that model goes, so it swaps per prefetch, not per job.",
        "Wait is a job's started_at - enqueued_at (the Redis clock), over every job of the batch; all jobs are "
        "submitted at once, so the last ones wait for the whole batch ahead of them even with no swap.",
        "Idle while jobs wait: seconds from the first submit to the last job's end when the worker held no job "
        "(none taken and unfinished, from the results' timings) although jobs were waiting: the worker idling "
        "with work queued. A job held while its model loads waits in its consumer, not on a thread, and "
        "starts (started_at) once the model is loaded: a load the worker waits for with nothing else to "
        "run counts here.",
        "Every model's first job starts within the bound: past it a job is taken by any worker (the plan's "
        "age bound). started_at is set when one of the worker's threads starts the job, so a job taken at the "
        "bound starts once its model is loaded: the slack is the longest model load of the run and 1 s "
        "for the consumer's wake-up.",
        f"The grouped run's bound ({bound:g} s) is chosen for this batch (SWAP_WAIT_S in bench/models.py): "
        "about the time the two loaded models need for their share of the batch. The default, 30 s, "
        "is for real models whose load takes many seconds.",
    ]
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


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose tokens/s is the median (the lower middle one of an even count), with every
    round's tokens/s beside it."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}


def _fcfs_replay(order: list[str], grouped: dict[str, Any], *, budget_bytes: int) -> dict[str, Any]:
    """First come first served over `order` (llama-swap's policy with a memory budget): a job whose
    model is not loaded loads it, unloading the least recently used models until it fits. Sizes are
    the grouped run's measured ones; the wall time is an estimate (see the module docstring)."""
    sizes: dict[str, int] = grouped["sizes"]
    loaded: list[str] = []  # least recently used first
    loads = swaps = 0
    for model in order:
        if model in loaded:
            loaded.remove(model)
            loaded.append(model)
            continue
        loads += 1
        evicted = False
        while loaded and sum(sizes[m] for m in loaded) + sizes[model] > budget_bytes:
            loaded.pop(0)
            evicted = True
        swaps += evicted
        loaded.append(model)
    mean_load = sum(grouped["load_s"]) / len(grouped["load_s"]) if grouped["load_s"] else 0.0
    wall = grouped["wall_s"] + max(0, swaps - grouped["swaps"]) * mean_load
    return {
        "loads": loads,
        "swaps": swaps,
        "mean_load_s": mean_load,
        "wall_s": wall,
        "tokens_per_s": grouped["tokens"] / wall if wall else float("nan"),
    }


def _mixed(jobs: int) -> list[str]:
    """The same mixed order for every scenario: each model a third of the jobs, shuffled."""
    order = [MODELS[n % len(MODELS)] for n in range(jobs)]
    random.Random(14).shuffle(order)
    return order


def _scenario(lab: Lab, routes: Path, order: list[str], *, budget_bytes: int, swap_wait_s: float) -> dict[str, Any]:
    settings = lab.settings(routes_file=routes)
    port = free_port()
    extra = ["--models", ",".join(MODELS), "--memory-budget-gb", repr(budget_bytes / GIB)]
    extra += ["--metrics-port", str(port), "--keep-alive", "600"]
    worker = lab.stack.start_worker(
        settings,
        backend="mlx",
        concurrency=8,
        shutdown_grace_s=5,
        cwd=REPO_DIR,
        wait=False,
        extra_args=extra,
        env={"GENQ_MAX_SWAP_WAIT_S": repr(swap_wait_s)},
    )
    try:
        _await_record(settings, worker)
        peak = _Peak(worker)
        peak.start()
        with Client(settings) as client:
            began = time.monotonic()
            began_wall = time.time()
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
        log = worker.log_path.read_text(errors="replace")
        events = _events(log, began_wall)
        load_s = [float(t) for t in _LOAD_TIME.findall(log)]
        waits = {r.job_id: r.timings.queue_wait_s or 0.0 for r in results}
        idle, longest = _idle_while_waiting(results)
        return {
            "budget_bytes": budget_bytes,
            "max_swap_wait_s": swap_wait_s,
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
            "queue_wait": latency_ms(list(waits.values())),
            "queue_wait_by_model": {m: latency_ms([waits[r.job_id] for r in results if r.model == m]) for m in MODELS},
            "idle_while_waiting_s": idle,
            "longest_idle_while_waiting_s": longest,
            "load_s": load_s,
            "events_text": " ".join(f"{sign}{model}@{at:.1f}" for at, sign, model in events),
        }
    finally:
        lab.stop_worker(worker)


_LOAD_TIME = re.compile(r": loaded \S+ in ([0-9.]+)s")
_EVENT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?: (loaded|unloading) (\S+)")


def _events(log: str, began_wall: float) -> list[tuple[float, str, str]]:
    """The worker's loads (when ready) and unloads, as (seconds from the first submit, "+"/"-", model)."""
    events = []
    for line in log.splitlines():
        match = _EVENT.match(line)
        if match:
            at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - began_wall
            events.append((round(at, 2), "+" if match[2] == "loaded" else "-", match[3]))
    return events


def _idle_while_waiting(results: list[GenerationResult]) -> tuple[float, float]:
    """Seconds (in all, and the longest stretch) from the first submit to the last job's end when the
    worker held no job: all jobs are submitted at once, so through every such gap some job was waiting
    and the worker ran none (a scheduler holding work back, or a consumer slow to wake). A job is held
    from started_at (the worker took it; it may then wait for its model's load) to finished_at."""
    spans = sorted(
        (r.timings.started_at.timestamp(), r.timings.finished_at.timestamp())
        for r in results
        if r.timings.started_at is not None
    )
    covered = min(r.timings.enqueued_at.timestamp() for r in results)
    total = longest = 0.0
    for start, end in spans:
        if start > covered:
            total += start - covered
            longest = max(longest, start - covered)
        covered = max(covered, end)
    return total, longest


def _waits(summary: dict[str, float]) -> str:
    return " / ".join(num(summary[key] / 1000, 1) for key in ("min_ms", "p95_ms", "max_ms"))


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
    parser.add_argument(
        "--swap-wait", type=float, default=None, help="the grouped run's GENQ_MAX_SWAP_WAIT_S (default per size)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' and servers' logs")
    args = parser.parse_args()
    options = Options(size=Size(args.size), out_dir=args.out, keep_logs=args.keep_logs)
    report = run(options, swap_wait_s=args.swap_wait)
    json_path, md_path = report.write()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
