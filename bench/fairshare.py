"""Fair share between tenants: a small batch submitted one second after a large one, on one worker.

Tenant A submits a large batch (2,000 lines at the default size), tenant B a small one (100 lines)
one second later; both go through the job store's admission with their tenant, which is what the
gateway's batch runner does for a gateway batch. Measured in one run, each on a fresh namespace of
the same worker and Redis:
- B alone and A alone (the reference times);
- both, with tenants: each tenant has its own lane of the queue and the worker serves them in turn;
- both, without tenants (the same submissions with no tenant: one lane, first come first served),
  which is what genq did before fair share and what dramatiq, Celery and the OpenAI Batch API do.

Targets (issue #16): B's batch finishes within 2 x its time alone, and A's total time grows by no
more than B's work (B's time alone).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import Lab, prompts
from bench.report import Options, Report, num, pick
from jobcontract.jobs import JobStore
from jobcontract.models import GenerationRequest, Lane
from jobcontract.settings import GenqSettings
from producer.client import Client

NAME = "fairshare"
CHUNK = 500  # lines admitted per script, as the batch runner does


def run(options: Options) -> Report:
    size = options.size
    big: int = pick(size, 100, 2_000, 2_000)
    small: int = pick(size, 10, 100, 100)
    max_tokens: int = pick(size, 8, 16, 32)
    concurrency = 8
    report = Report(NAME, "Fair share: a small tenant's batch one second after a large one's, on one worker", options)
    report.params = {
        "tenant_a_lines": big,
        "tenant_b_lines": small,
        "b_submitted_after_s": 1.0,
        "max_tokens": max_tokens,
        "worker": f"one genq worker process, mlx, {concurrency} slots",
        "submitted_through": "JobStore.submit_many with the tenant, in chunks of 500 (as the gateway's batch runner)",
    }
    with Lab(options, NAME) as lab:
        settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route()]))
        worker = lab.start_worker(settings, concurrency=concurrency)
        _scenario(settings, {"A": 2 * concurrency}, max_tokens, 0.0)  # warm-up
        b_alone = _scenario(settings, {"B": small}, max_tokens, 0.0)
        a_alone = _scenario(settings, {"A": big}, max_tokens, 0.0)
        fair = _scenario(settings, {"A": big, "B": small}, max_tokens, 1.0)
        fcfs = _scenario(settings, {"A": big, "B": small}, max_tokens, 1.0, tenants=False)
        lab.stop_worker(worker)
    report.results = {"b_alone": b_alone, "a_alone": a_alone, "fair": fair, "fcfs": fcfs}
    b_ref, a_ref = b_alone["B"], a_alone["A"]
    rows = [
        ["B alone", "-", f"{num(b_ref, 1)} s", "1.00"],
        ["A alone", f"{num(a_ref, 1)} s", "-", "-"],
        [
            "both, tenants served in turn",
            f"{num(fair['A'], 1)} s (+{num(fair['A'] - a_ref, 1)} s)",
            f"{num(fair['B'], 1)} s",
            num(fair["B"] / b_ref, 2),
        ],
        [
            "both, first come first served (no tenants)",
            f"{num(fcfs['A'], 1)} s (+{num(fcfs['A'] - a_ref, 1)} s)",
            f"{num(fcfs['B'], 1)} s",
            num(fcfs["B"] / b_ref, 2),
        ],
    ]
    report.table(
        f"A: {big} lines, B: {small} lines 1 s later, {max_tokens} tokens each, one worker of {concurrency} slots",
        ["run", "A's batch done after", "B's batch done after (from its submission)", "B vs alone"],
        rows,
    )
    report.target("B's batch vs alone, tenants in turn", "<= 2.0 x", fair["B"] / b_ref, "x", lambda v: v <= 2.0)
    report.target("A's added time vs B's work alone", "<= 1.0 x", (fair["A"] - a_ref) / b_ref, "x", lambda v: v <= 1.0)
    report.notes.append(
        "Times run from each tenant's own submission to its last result. The worker holds at most its slots "
        "and two prefetched jobs of A when B arrives; after that the tenants' partitions are served in turn "
        "(start-time fair queueing, jobcontract/protocol/take.lua)."
    )
    return report


def _scenario(
    settings: GenqSettings, sizes: dict[str, int], max_tokens: int, stagger_s: float, *, tenants: bool = True
) -> dict[str, Any]:
    """Submit each tenant's batch (the second `stagger_s` after the first) and time each to its last result."""
    route = settings.routes.get("tiny")
    done: dict[str, float] = {}
    errors: list[str] = []
    with Client(settings) as client:
        store: JobStore = client.store

        def tenant_run(tenant: str, lines: int, delay: float) -> None:
            time.sleep(delay)
            started = time.perf_counter()
            requests = [
                GenerationRequest(model="tiny", prompt=p, max_tokens=max_tokens, temperature=0.0, lane=Lane.BATCH)
                for p in prompts(lines, f"{tenant}{time.monotonic_ns()}")
            ]
            ids: list[str] = []
            for i in range(0, lines, CHUNK):
                receipts = store.submit_many(
                    requests[i : i + CHUNK],
                    route_for=lambda _: route,
                    default_timeout_s=3600,
                    tenant=tenant if tenants else None,
                )
                ids += [r.job_id for r in receipts]
            results = store.wait_many(ids, timeout_s=3600)
            failed = [r for r in results.values() if not r.ok]
            if failed:
                errors.append(f"{tenant}: {len(failed)} failed, first: {failed[0].error}")
            done[tenant] = time.perf_counter() - started

        threads = [
            threading.Thread(target=tenant_run, args=(tenant, lines, i * stagger_s))
            for i, (tenant, lines) in enumerate(sizes.items())
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return done
