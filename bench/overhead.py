"""Overhead per job: what genq adds to a generation, on an idle worker and on a busy one, beside
plain dramatiq (its Redis broker and Results backend) running a no-op actor in the same run.

genq's overhead for one job is its end-to-end latency as the caller sees it (submit, then the
result in hand) minus the time the worker spent in its backend call for that job, so the backend's
own speed drops out and what is left is admission, delivery, start, finish and the wake-up of the
waiting caller. As a second view, the same server is also called directly with the same prompts,
and the latency distributions are compared; so is `genq gateway` (the same jobs over HTTP), its
probes interleaved with the Python client's and the direct ones. A no-op dramatiq actor's whole
latency is its overhead, so the two are comparable.

Idle probes come one at a time after a random pause, so each reaches a worker that has been
waiting (where dramatiq's polling consumer shows its backoff); busy probes run while other jobs
keep the worker (or the dramatiq worker) busy.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from bench.common import REPO_DIR, DirectClient, Lab, clean_env, prompts
from bench.gateway_cost import start_gateway
from bench.report import Options, Report, latency_ms, num, pick
from genq.processes import stop as stop_process
from jobcontract.jobs import JobStore, StartTicket
from jobcontract.keys import Keys
from jobcontract.models import (
    Backend,
    GenerationRequest,
    GenerationResult,
    JobState,
    Timings,
    utc_from_micros,
)
from producer.client import Client

NAME = "overhead"
P50_TARGET_MS = 2.0
P99_TARGET_MS = 10.0
GATEWAY_P50_TARGET_MS = 3.0


class Background:
    """`streams` threads that each keep one job in flight until the block ends."""

    def __init__(self, streams: int, call: Callable[[str], object], tag: str) -> None:
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(call, f"{tag}-{i}"), daemon=True) for i in range(streams)
        ]

    def _loop(self, call: Callable[[str], object], tag: str) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                call(f"{tag} {n}")
            except Exception as error:  # reported after the block; a probe run must not hang on it
                self.errors.append(error)
                return
            n += 1
            with self._lock:
                self.done += 1

    def __enter__(self) -> Background:
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)  # let the load settle before measuring beside it
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        if self.errors and error is None:
            raise RuntimeError(f"background load failed: {self.errors[0]!r}") from self.errors[0]


def run(options: Options) -> Report:
    size = options.size
    idle_n: int = pick(size, 4, 30, 200)
    busy_n: int = pick(size, 6, 150, 1000)
    idle_gap: tuple[float, float] = pick(size, (0.05, 0.3), (0.2, 1.0), (0.2, 1.0))
    busy_gap = (0.0, 0.02)
    streams: int = pick(size, 2, 4, 4)
    max_tokens: int = pick(size, 16, 16, 16)
    load_tokens = 32
    rng = random.Random(7)
    report = Report(NAME, "Overhead per job: genq vs direct calls, and plain dramatiq on a no-op actor", options)
    report.params = {
        "idle_probes": idle_n,
        "busy_probes": busy_n,
        "idle_gap_s": idle_gap,
        "busy_gap_s": busy_gap,
        "busy_background_streams": streams,
        "probe_max_tokens": max_tokens,
        "background_max_tokens": load_tokens,
        "genq_worker": {"processes": 1, "concurrency": 8},
        "gateway": "genq gateway (one process) beside the Python client, probes interleaved",
        "dramatiq_worker": {"processes": 1, "threads": 8, "broker": "RedisBroker", "results": "RedisBackend"},
    }
    with Lab(options, NAME) as lab:
        genq = _measure_genq(lab, rng, idle_n, busy_n, idle_gap, busy_gap, streams, max_tokens, load_tokens)
        plain = _measure_dramatiq(lab, rng, idle_n, busy_n, idle_gap, busy_gap, streams)
        floor = _redis_floor(lab, pick(size, 20, 200, 1000))
    report.results = {"genq": genq, "dramatiq": plain, "floor": floor}
    rows = []
    for mode in ("idle", "busy"):
        g = genq[mode]
        rows.append(_row(f"genq overhead per job, Python client ({mode})", g["overhead"]))
        rows.append(_row(f"genq overhead per job, gateway ({mode})", g["gateway_overhead"]))
        rows.append(_row(f"- call to queued ({mode})", g["submit"]))
        rows.append(_row(f"- queued to started on the worker ({mode})", g["queue_wait"]))
        rows.append(_row(f"- finished to result in the caller's hand ({mode})", g["finish"]))
        rows.append(_row(f"genq end to end, Python client ({mode})", g["e2e"]))
        rows.append(_row(f"genq end to end, gateway ({mode})", g["gateway"]))
        rows.append(_row(f"worker's backend call, plain completion ({mode})", g["backend_call"]))
        rows.append(_row(f"direct call, same server ({mode})", g["direct"]))
        rows.append(_row(f"plain dramatiq no-op end to end ({mode})", plain[mode]["e2e"]))
    report.table(f"Latency in ms, {max_tokens}-token jobs", ["what", "n", "p50", "p95", "p99", "max"], rows)
    diff_rows = [
        [
            mode,
            label,
            *(num(genq[mode][side][f"{q}_ms"] - genq[mode]["direct"][f"{q}_ms"], 2) for q in ("p50", "p95", "p99")),
        ]
        for mode in ("idle", "busy")
        for side, label in (("e2e", "Python client"), ("gateway", "gateway"))
    ]
    report.table(
        "Latency added over a direct call, percentile by percentile (ms)",
        ["worker", "path", "p50", "p95", "p99"],
        diff_rows,
    )
    report.table(
        "The floor: one job's own steps timed alone in this process, no worker (ms)",
        ["step", "n", "p50", "p95", "p99", "max"],
        [_row(label, floor[key]) for key, label in FLOOR_STEPS.items()],
    )
    for mode in ("idle", "busy"):
        for side, label, p50_limit in (
            ("overhead", "client", P50_TARGET_MS),
            ("gateway_overhead", "gateway", GATEWAY_P50_TARGET_MS),
        ):
            added = genq[mode][side]
            report.target(
                f"{label} added p50 ({mode})", f"<= {p50_limit} ms", added["p50_ms"], "ms", _at_most(p50_limit)
            )
            report.target(
                f"{label} added p99 ({mode})", f"<= {P99_TARGET_MS} ms", added["p99_ms"], "ms", _at_most(P99_TARGET_MS)
            )
    report.notes += [
        "Overhead per job = the caller's end-to-end latency minus the worker's backend call for that job "
        "(result.timings.generation_s; the gateway's answer carries the same timings): what genq adds over "
        "calling the server, job by job, and what the targets are measured on. As a second view, "
        "percentiles of end-to-end latency minus the same percentile of direct calls, probes of the three "
        "paths interleaved (noisier: the server's own spread is in it).",
        f"p99 of {idle_n} idle probes is close to their maximum; run --size full for a steadier tail.",
    ]
    return report


FLOOR_STEPS = {
    "ping": "one Redis round trip (PING), for scale",
    "validate": "validate a request at the door",
    "submit": "admit it (Client.submit_many: SCRIPT EXISTS, then the Lua call)",
    "start": "mark it running (one Lua call)",
    "finish": "record its result (one Lua call)",
    "wake": "finish called to a blocked waiter holding the result",
}


def _redis_floor(lab: Lab, n: int) -> dict[str, Any]:
    """What the Redis work of one job costs with no worker and no load: the part of the overhead no
    thread hand-off or process switch is in, so the rest of the measured overhead is theirs."""
    settings = lab.settings(routes_file=lab.routes("floor", [lab.mlx_route()]))
    redis_client = lab.client()
    store = JobStore(redis_client, Keys(settings.namespace), result_ttl_s=600, max_queued=10**7)
    timings: dict[str, list[float]] = {key: [] for key in FLOOR_STEPS}

    def lap(step: str, started: float) -> None:
        timings[step].append(time.perf_counter() - started)

    with Client(settings) as client:
        for text in prompts(n, "floor"):
            started = time.perf_counter()
            redis_client.ping()
            lap("ping", started)
            started = time.perf_counter()
            request = client.validate({"model": "tiny", "prompt": text, "max_tokens": 8})
            lap("validate", started)
            started = time.perf_counter()
            [receipt] = store.submit_many([request], route_for=settings.routes.get, default_timeout_s=600)
            lap("submit", started)
            started = time.perf_counter()
            ticket = store.start(receipt.job_id, "bench", Backend.MLX, receipt.queue)
            lap("start", started)
            assert isinstance(ticket, StartTicket)
            result = _result(receipt.job_id, ticket)
            started = time.perf_counter()
            store.finish(result)
            lap("finish", started)
            # Again with a caller blocked on the result (a thread here, so it includes a GIL hand-off).
            [receipt] = store.submit_many([request], route_for=settings.routes.get, default_timeout_s=600)
            ticket = store.start(receipt.job_id, "bench", Backend.MLX, receipt.queue)
            assert isinstance(ticket, StartTicket)
            woke: list[float] = []

            def wait(job_id: str = receipt.job_id, woke: list[float] = woke) -> None:
                store.wait(job_id, 10)
                woke.append(time.perf_counter())

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.005)  # the waiter is blocked in XREAD by now
            result = _result(receipt.job_id, ticket)
            started = time.perf_counter()
            store.finish(result)
            waiter.join(timeout=10)
            timings["wake"].append(woke[0] - started)
    return {key: latency_ms(values) for key, values in timings.items()}


def _result(job_id: str, ticket: StartTicket) -> GenerationResult:
    now = utc_from_micros(ticket.started_us)
    return GenerationResult(
        job_id=job_id,
        model="tiny",
        state=JobState.SUCCEEDED,
        text="x" * 32,
        timings=Timings(enqueued_at=now, started_at=now, first_token_at=now, finished_at=now),
    )


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _row(label: str, stats: dict[str, float]) -> list[str]:
    return [label, str(int(stats["n"])), *(num(stats[k], 2) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))]


def _measure_genq(
    lab: Lab,
    rng: random.Random,
    idle_n: int,
    busy_n: int,
    idle_gap: tuple[float, float],
    busy_gap: tuple[float, float],
    streams: int,
    max_tokens: int,
    load_tokens: int,
) -> dict[str, Any]:
    settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route()]))
    worker = lab.start_worker(settings, concurrency=8)
    gateway, gateway_url = start_gateway(settings, lab.run_dir, None, False)
    lab.closers.append(lambda: _stop_gateway(gateway))
    [url] = worker.server_urls()
    model = str(lab.mlx_model)
    with (
        Client(settings) as client,
        Client(settings) as load_client,
        DirectClient(url, model) as http,
        httpx.Client(base_url=gateway_url, timeout=120) as gateway_http,
    ):

        def genq_probe(prompt: str) -> dict[str, float]:
            request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
            called_at = time.time()  # same host as Redis: its TIME and this clock agree
            started = time.perf_counter()
            result = client.generate(request, timeout=120)
            e2e = time.perf_counter() - started
            returned_at = time.time()
            if not result.ok:
                raise RuntimeError(f"probe job {result.job_id} {result.state.value}: {result.error}")
            t = result.timings
            assert t.generation_s is not None and t.queue_wait_s is not None
            return {
                "e2e": e2e,
                "backend": t.generation_s,
                "queue_wait": t.queue_wait_s,
                "submit": t.enqueued_at.timestamp() - called_at,
                "finish": returned_at - t.finished_at.timestamp(),
            }

        def direct_probe(prompt: str) -> float:
            return http.complete(prompt, max_tokens)[0]

        def gateway_probe(prompt: str) -> dict[str, float]:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            started = time.perf_counter()
            response = gateway_http.post("/v1/completions", json=body)
            e2e = time.perf_counter() - started
            response.raise_for_status()
            return {"e2e": e2e, "backend": float(response.json()["genq"]["timings"]["generation_s"])}

        def load(prompt: str) -> None:
            request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=load_tokens, temperature=0.0)
            if not load_client.generate(request, timeout=300).ok:
                raise RuntimeError("a background job failed")

        for prompt in prompts(5, "warm"):
            genq_probe(prompt)
            direct_probe(prompt)
            gateway_probe(prompt)
        out: dict[str, Any] = {}
        idle = _probe_rounds(rng, prompts(idle_n, "idle"), idle_gap, genq_probe, direct_probe, gateway_probe)
        with Background(streams, load, "load") as background:
            busy = _probe_rounds(rng, prompts(busy_n, "busy"), busy_gap, genq_probe, direct_probe, gateway_probe)
        out["background_jobs_done"] = background.done
        for mode, (g, d, gw) in (("idle", idle), ("busy", busy)):
            out[mode] = {
                "overhead": latency_ms([p["e2e"] - p["backend"] for p in g]),
                "submit": latency_ms([p["submit"] for p in g]),
                "queue_wait": latency_ms([p["queue_wait"] for p in g]),
                "finish": latency_ms([p["finish"] for p in g]),
                "e2e": latency_ms([p["e2e"] for p in g]),
                "backend_call": latency_ms([p["backend"] for p in g]),
                "direct": latency_ms(d),
                "gateway": latency_ms([p["e2e"] for p in gw]),
                "gateway_overhead": latency_ms([p["e2e"] - p["backend"] for p in gw]),
            }
    stop_process(gateway, timeout_s=10)
    lab.stop_worker(worker)
    return out


def _probe_rounds(
    rng: random.Random,
    texts: list[str],
    gap: tuple[float, float],
    genq_probe: Callable[[str], dict[str, float]],
    direct_probe: Callable[[str], float],
    gateway_probe: Callable[[str], dict[str, float]],
) -> tuple[list[dict[str, float]], list[float], list[dict[str, float]]]:
    """One probe of each path per prompt (the Python client, a direct call, the gateway), each after
    its own pause, the order rotating from prompt to prompt so drifting load hits all three alike."""
    genq: list[dict[str, float]] = []
    direct: list[float] = []
    gateway: list[dict[str, float]] = []
    sides = ("genq", "direct", "gateway")
    for i, text in enumerate(texts):
        for side in sides[i % 3 :] + sides[: i % 3]:
            time.sleep(rng.uniform(*gap))
            if side == "genq":
                genq.append(genq_probe(text))
            elif side == "direct":
                direct.append(direct_probe(text + " (direct)"))
            else:
                gateway.append(gateway_probe(text + " (gateway)"))
    return genq, direct, gateway


def _measure_dramatiq(
    lab: Lab,
    rng: random.Random,
    idle_n: int,
    busy_n: int,
    idle_gap: tuple[float, float],
    busy_gap: tuple[float, float],
    streams: int,
) -> dict[str, Any]:
    from bench.dramatiq_app import URL_ENV, setup

    log_path = lab.run_dir / "dramatiq-worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "bench.dramatiq_app", "--processes", "1", "--threads", "8"],
            env=clean_env({URL_ENV: lab.url}),
            cwd=REPO_DIR,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lab.closers.append(lambda: _stop_group(process))
    broker, backend, actor = setup(lab.url)
    lab.closers.append(broker.close)

    def probe(_: str = "") -> float:
        started = time.perf_counter()
        message = actor.send()
        message.get_result(backend=backend, block=True, timeout=60_000)
        return time.perf_counter() - started

    try:
        probe()  # waits for the worker to boot
    except Exception as error:
        raise RuntimeError(f"the dramatiq worker did not answer: {log_path.read_text()[-3000:]}") from error
    for _ in range(5):
        probe()
    idle = []
    for _ in range(idle_n):
        time.sleep(rng.uniform(*idle_gap))
        idle.append(probe())
    busy = []
    with Background(streams, probe, "load") as background:
        for _ in range(busy_n):
            time.sleep(rng.uniform(*busy_gap))
            busy.append(probe())
    _stop_group(process)
    return {
        "idle": {"e2e": latency_ms(idle)},
        "busy": {"e2e": latency_ms(busy)},
        "background_jobs_done": background.done,
    }


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _stop_gateway(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout_s=10)
