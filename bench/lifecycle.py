"""Server lifecycle: how soon a genq worker serves after it starts, how soon it serves again after
its server crashes, how fast later requests are, and what genq's own processes cost in memory,
each beside the bare `mlx_lm.server` doing the same (a restart can never beat a cold start).

A job is submitted the moment the worker is launched, so "first result" is what a caller that was
already waiting sees; "ready" is when the worker joins its pool in Redis. A crash is a SIGKILL of
the worker's server with a job submitted right after it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx

from bench.common import DirectClient, Lab, WorkerProc, prompts, rss_mb, wait_until
from bench.report import Options, Report, latency_ms, num, pick
from jobcontract.keys import Keys
from jobcontract.models import Backend, GenerationRequest, GenerationResult
from producer.client import Client
from workers.circuit import CircuitBreaker

NAME = "lifecycle"
MAX_TOKENS = 8
# A worker is a server plus genq: it may take this much longer than the bare server (p50 to p50).
BEYOND_BARE_S = 0.3


def run(options: Options) -> Report:
    size = options.size
    starts: int = pick(size, 1, 4, 6)
    later_n: int = pick(size, 3, 20, 100)
    crashes: int = pick(size, 1, 3, 10)
    concurrency = 8
    report = Report(NAME, "Server lifecycle: genq worker vs bare mlx_lm.server", options)
    report.params = {
        "starts": starts,
        "later_requests": later_n,
        "crashes": crashes,
        "max_tokens": MAX_TOKENS,
        "worker": {"processes": 1, "concurrency": concurrency},
    }
    bare: list[dict[str, float]] = []
    genq: list[dict[str, float]] = []
    steady: dict[str, Any] = {}
    with Lab(options, NAME) as lab:
        for _ in range(starts):
            bare.append(_bare_start(lab, concurrency))
        routes = lab.routes("mlx", [lab.mlx_route(max_attempts=3)])
        for n in range(starts):
            settings = lab.settings(routes_file=routes)
            launched_worker, first = _worker_start(lab, settings, concurrency, f"start {n}")
            genq.append(first)
            if n == 0:
                steady = _steady_state(lab, launched_worker, settings, later_n, crashes)
            stop_started = time.monotonic()
            lab.stop_worker(launched_worker)
            genq[-1]["stop_s"] = time.monotonic() - stop_started
    report.results = {
        "bare": bare,
        "genq": genq,
        **steady,
        "bare_summary": {k: latency_ms([b[k] for b in bare]) for k in ("ready_s", "first_completion_s")},
        "genq_summary": {k: latency_ms([g[k] for g in genq]) for k in ("ready_s", "first_result_s", "stop_s")},
        # The first start of the command line has no launch remembered (workers.prelaunch); the others do.
        "genq_first_run_ready_s": latency_ms([genq[0]["ready_s"]]),
        "genq_run_before_ready_s": latency_ms([g["ready_s"] for g in genq[1:]]) if len(genq) > 1 else None,
    }
    r = report.results
    bare_ready, bare_first = r["bare_summary"]["ready_s"], r["bare_summary"]["first_completion_s"]
    g = r["genq_summary"]
    first_run, run_before = r["genq_first_run_ready_s"], r["genq_run_before_ready_s"]
    rows = [
        [
            "start to ready, the command line's first run (joins its pool / answers /health)",
            _ms(first_run),
            _ms(bare_ready),
        ],
        *(
            [["start to ready, a command line run before (its launch remembered)", _ms(run_before), _ms(bare_ready)]]
            if run_before
            else []
        ),
        ["start to first result (job sent at launch)", _ms(g["first_result_s"]), _ms(bare_first)],
        ["server SIGKILLed to next result", _ms(r["crash"]["serving_again_s"]), _ms(bare_first) + " (cold start)"],
        [
            "server SIGKILLed to new server answering",
            _ms(r["crash"]["server_back_s"]),
            _ms(bare_ready) + " (cold start)",
        ],
        ["later requests, end to end", _ms(r["later"]["genq"]), _ms(r["later"]["direct"])],
        ["graceful stop (SIGTERM to exit)", _ms(g["stop_s"]), "-"],
    ]
    report.table(
        f"Times in ms, p50 (max) over {starts} start(s), {crashes} crash(es), {later_n} later request(s)",
        ["what", "genq worker", "bare mlx_lm.server"],
        rows,
    )
    mem = r["memory"]
    report.table(
        "Memory (RSS, MB) after the later requests",
        ["genq's own processes", "its mlx_lm.server", "bare mlx_lm.server", "genq processes"],
        [[num(mem["genq_mb"]), num(mem["servers_mb"]), num(mem["bare_server_mb"]), str(mem["genq_processes"])]],
    )
    for label, ready in (("its first run", first_run), ("a command line run before", run_before)):
        if ready:
            report.target(
                f"worker start to ready, beyond the bare server's: {label}",
                f"<= {BEYOND_BARE_S} s",
                (ready["p50_ms"] - bare_ready["p50_ms"]) / 1000,
                "s",
                lambda v: v <= BEYOND_BARE_S,
            )
    report.target(
        "server crash to the next result, beyond a bare cold start",
        f"<= {BEYOND_BARE_S} s",
        (r["crash"]["serving_again_s"]["p50_ms"] - bare_first["p50_ms"]) / 1000,
        "s",
        lambda v: v <= BEYOND_BARE_S,
    )
    report.target("worker start to first result", "< 5 s", g["first_result_s"]["max_ms"] / 1000, "s", lambda v: v < 5)
    report.target("later requests", "< 2 s", r["later"]["genq"]["max_ms"] / 1000, "s", lambda v: v < 2)
    report.target("genq memory beside the server", "< 500 MB", mem["genq_mb"], "MB", lambda v: v < 500)
    report.notes.append(
        "genq's own processes are the supervisor, its worker process and multiprocessing's resource tracker; "
        "the server's RSS is the weights plus mlx."
    )
    report.notes.append(
        "Each start runs the same `genq worker` command line in the same folder. The first has no launch "
        "remembered; the later ones start the server the last run launched before reading their settings, "
        "and check it against them (workers.prelaunch), as a restarted worker does."
    )
    return report


def _ms(stats: dict[str, float]) -> str:
    return f"{num(stats['p50_ms'], 0)} ({num(stats['max_ms'], 0)})"


def _bare_start(lab: Lab, concurrency: int) -> dict[str, float]:
    server = lab.bare_mlx(concurrency=concurrency)
    server.launch()
    ready = server.wait_ready()
    with DirectClient(server.url, server.model) as http:
        http.complete("a first prompt", MAX_TOKENS)
        first = time.monotonic() - server.launched
    assert server.process is not None
    memory = rss_mb(server.process.pid)
    lab.stop_server(server)
    return {"ready_s": ready, "first_completion_s": first, "rss_mb": memory}


def _worker_start(lab: Lab, settings: Any, concurrency: int, prompt: str) -> tuple[WorkerProc, dict[str, float]]:
    worker = lab.start_worker(settings, concurrency=concurrency, wait=False)
    box: dict[str, Any] = {}

    def first_result() -> None:
        try:
            with Client(settings) as client:
                box["result"] = client.generate(_request(prompt), timeout=300)
                box["at"] = time.monotonic()
        except Exception as error:
            box["error"] = error

    waiter = threading.Thread(target=first_result, daemon=True)
    waiter.start()
    ready = worker.wait_ready()
    waiter.join(timeout=300)
    if "error" in box or not isinstance(box.get("result"), GenerationResult) or not box["result"].ok:
        raise RuntimeError(f"the first job failed: {box.get('error') or box.get('result')}\n{worker.log()}")
    return worker, {"ready_s": ready, "first_result_s": box["at"] - worker.launched}


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)


def _steady_state(lab: Lab, worker: WorkerProc, settings: Any, later_n: int, crashes: int) -> dict[str, Any]:
    [url] = worker.server_urls()
    model = str(lab.mlx_model)
    genq_later, direct_later = [], []
    with Client(settings) as client, DirectClient(url, model) as http:
        for prompt in prompts(later_n, "later"):
            started = time.perf_counter()
            if not client.generate(_request(prompt), timeout=120).ok:
                raise RuntimeError("a later request failed")
            genq_later.append(time.perf_counter() - started)
            direct_later.append(http.complete(prompt + " (direct)", MAX_TOKENS)[0])
        memory = worker.memory_mb()
        bare = lab.bare_mlx(concurrency=8)
        bare.launch()
        bare.wait_ready()
        with DirectClient(bare.url, bare.model) as bare_http:
            bare_http.complete("warm", MAX_TOKENS)
        assert bare.process is not None
        memory["bare_server_mb"] = rss_mb(bare.process.pid)
        lab.stop_server(bare)
        memory["genq_processes"] = 1 + len(worker.worker_pids())
        circuit = CircuitBreaker(lab.client(), Keys(settings.namespace), "tiny")
        serving_again, server_back = [], []
        for prompt in prompts(crashes, "crash"):
            circuit.close(Backend.MLX)
            [server] = worker.server_pids()
            back: list[float] = []
            watcher = threading.Thread(target=_watch_restart, args=(worker, server, back), daemon=True)
            killed = time.monotonic()
            os.kill(server, signal.SIGKILL)
            watcher.start()
            if not client.generate(_request(prompt), timeout=300).ok:
                raise RuntimeError(f"the job sent after a crash failed\n{worker.log()}")
            serving_again.append(time.monotonic() - killed)
            watcher.join(timeout=120)
            if not back:
                raise RuntimeError(f"the server was not restarted\n{worker.log()}")
            server_back.append(back[0] - killed)
            time.sleep(0.3)
    return {
        "later": {"genq": latency_ms(genq_later), "direct": latency_ms(direct_later)},
        "memory": memory,
        "crash": {"serving_again_s": latency_ms(serving_again), "server_back_s": latency_ms(server_back)},
    }


def _watch_restart(worker: WorkerProc, old: int, back: list[float]) -> None:
    """Record when a new server (not `old`) first answers /health."""
    with httpx.Client(timeout=1.0) as http:

        def answers() -> bool:
            pids = worker.server_pids()
            if not pids or old in pids:
                return False
            urls = worker.server_urls()
            try:
                return bool(urls) and http.get(urls[0] + "/health").status_code == 200
            except httpx.HTTPError:
                return False

        if wait_until(answers, 120, interval=0.05):
            back.append(time.monotonic())
