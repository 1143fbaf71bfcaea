"""What waiting for a replica (WAIT 1, jobcontract.durability) costs per job: admission one by
one, admission in batches of 100, and finish, with and without it, against a private master and
one replica on loopback (both private redis-servers, never the shared one).

`python -m bench.replica_wait [--jobs N]` writes bench/results/replica_wait.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.jobs import JobStore
from jobcontract.keys import Keys
from jobcontract.models import GenerationRequest, GenerationResult, JobState, Timings
from jobcontract.settings import GenqSettings

RESULTS = Path(__file__).parent / "results"


def _timed(count: int, call: Callable[[int], object]) -> list[float]:
    samples = []
    for n in range(count):
        began = time.perf_counter()
        call(n)
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def _summary(samples: list[float], per: int = 1) -> dict[str, float]:
    ordered = sorted(s / per for s in samples)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


def measure(url: str, jobs: int) -> dict[str, dict[str, float]]:
    settings = GenqSettings(redis_url=url, namespace=f"b{uuid.uuid4().hex[:6]}")
    client = connect(settings.redis_url)
    store = JobStore(client, Keys(settings.namespace), result_ttl_s=600, max_queued=10**7)
    route = settings.routes.get("tiny")
    request = GenerationRequest.model_validate({"model": "tiny", "prompt": "bench", "max_tokens": 4})
    ids: list[str] = []

    def submit(_n: int) -> None:
        ids.append(store.submit(request, route, default_timeout_s=60).job_id)

    def submit_100(_n: int) -> None:
        store.submit_many([request] * 100, route_for=lambda _m: route, default_timeout_s=60)

    def finish(n: int) -> None:
        now = datetime.now(UTC)
        store.finish(
            GenerationResult(
                job_id=ids[n],
                model="tiny",
                state=JobState.SUCCEEDED,
                text="x",
                finish_reason="stop",
                timings=Timings(enqueued_at=now, finished_at=now),
            )
        )

    figures = {
        "submit_one": _summary(_timed(jobs, submit)),
        "submit_100_per_job": _summary(_timed(max(20, jobs // 20), submit_100), per=100),
        "finish": _summary(_timed(jobs, finish)),
    }
    client.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    jobs = parser.parse_args().jobs
    with LocalRedis() as master, LocalRedis() as replica:
        with redis.Redis(port=replica.port) as r:
            r.replicaof("127.0.0.1", master.port)
        with redis.Redis(port=master.port) as m:
            while m.info("replication").get("slave0", {}).get("state") != "online":  # done with its first sync
                time.sleep(0.05)
        base = master.url
        runs = {
            "no_wait": measure(f"{base}?min_replicas=0", jobs),
            "wait_1_replica": measure(f"{base}?min_replicas=1&wait_ms=500", jobs),
        }
    cost = {
        name: round(runs["wait_1_replica"][name]["p50_ms"] - runs["no_wait"][name]["p50_ms"], 3)
        for name in runs["no_wait"]
    }
    load = round(os.getloadavg()[0], 1)
    report = {
        "jobs": jobs,
        "load_average": load,
        "runs": runs,
        "added_p50_ms": cost,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replica_wait.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# What WAIT 1 costs per job ({jobs} jobs, master and replica on loopback)",
        "",
        f"Load average {load} on 2 shared cores at the end of the run: the p99s are mostly the neighbours.",
        "",
        "| call | no WAIT p50 / p99 (ms) | WAIT 1 p50 / p99 (ms) | added p50 (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in runs["no_wait"]:
        a, b = runs["no_wait"][name], runs["wait_1_replica"][name]
        lines.append(f"| {name} | {a['p50_ms']} / {a['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} | {cost[name]} |")
    (RESULTS / "replica_wait.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
