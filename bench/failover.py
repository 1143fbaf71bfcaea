"""Failover: from a job's first-token deadline expiring on a frozen mlx server to its first token
on llama.cpp, beside llama.cpp's own time to first token when called directly.

An mlx worker and a llama.cpp worker serve the tiny model; the routes give mlx a short first-token
timeout and one attempt, so a timeout there reroutes at once. The mlx server is frozen with
SIGSTOP (its worker's hang detection is set out of reach, so it stays frozen) and jobs are sent
one at a time. Each result carries its attempts and timings, all on the Redis clock:

    deadline   = mlx attempt start + first_token_timeout_s
    failover   = first token on llama.cpp - deadline
               = (mlx attempt end - deadline)           detection
               + (llama.cpp attempt start - mlx end)    reroute and pick-up
               + (first token - llama.cpp start)        llama.cpp's time to first token

The pool's circuit breaker is closed again before each job, so every job meets the frozen server
as the first ones after a freeze do (once it opens, new jobs skip mlx and no failover happens).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import Lab, prompts
from bench.report import Options, Report, latency_ms, llama_server_version, num, pick
from jobcontract.keys import Keys
from jobcontract.models import AttemptOutcome, Backend, GenerationRequest, GenerationResult
from producer.client import Client
from workers.circuit import CircuitBreaker

NAME = "failover"
FIRST_TOKEN_TIMEOUT_S = 0.5
TARGET_MS = 100.0


def find_llama_server(explicit: str | None) -> str | None:
    """The binary to use: given, else from the environment, PATH or ops/build_llama_server.sh's cache;
    None means the worker falls back to `python -m llama_cpp.server`."""
    for candidate in (explicit, os.environ.get("GENQ_LLAMA_SERVER_BIN"), os.environ.get("GENQ_TEST_LLAMA_SERVER")):
        if candidate:
            return candidate
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    cache = Path(os.environ.get("GENQ_CACHE_DIR", "~/.cache/genq")).expanduser()
    built = sorted(glob.glob(str(cache / "llama-server" / "*" / "bin" / "llama-server")))
    return built[-1] if built and os.access(built[-1], os.X_OK) else None


def run(options: Options) -> Report:
    size = options.size
    samples: int = pick(size, 2, 12, 50)
    direct_n: int = pick(size, 3, 12, 50)
    max_tokens = 8
    binary = find_llama_server(options.llama_server)
    report = Report(NAME, "Failover: frozen mlx server to first token on llama.cpp", options)
    report.params = {
        "samples": samples,
        "max_tokens": max_tokens,
        "mlx_route": {"first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S, "max_attempts": 1},
        "llama_server": binary or "python -m llama_cpp.server",
        "llama_server_version": llama_server_version(binary) if binary else None,
        "freeze": "SIGSTOP on the mlx worker's server, GENQ_SERVER_HANG_TIMEOUT_S=3600 on that worker",
    }
    with Lab(options, NAME) as lab:
        routes = lab.routes(
            "failover",
            [
                lab.mlx_route(
                    first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, token_timeout_s=FIRST_TOKEN_TIMEOUT_S, max_attempts=1
                ),
                {
                    "path": str(lab.gguf_model),
                    "first_token_timeout_s": 60.0,
                    "token_timeout_s": 60.0,
                    "context_length": 512,
                },
            ],
        )
        settings = lab.settings(routes_file=routes)
        llama_env = {"GENQ_LLAMA_SERVER_BIN": binary} if binary else {}
        llama = lab.start_worker(settings, backend="llamacpp", concurrency=4, env=llama_env, wait=False)
        mlx = lab.start_worker(settings, backend="mlx", concurrency=4, env={"GENQ_SERVER_HANG_TIMEOUT_S": "3600"})
        llama.wait_ready()
        [llama_url] = llama.server_urls()
        [mlx_server] = mlx.server_pids()
        circuit_client = lab.client()
        circuit = CircuitBreaker(circuit_client, Keys(settings.namespace), "tiny")
        with Client(settings) as client:

            def job(prompt: str, backend: Backend | None = None) -> GenerationResult:
                # Streamed: the failover is measured to the first token, which only a streamed job has.
                request = GenerationRequest(
                    model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0, backend=backend, stream=True
                )
                return client.generate(request, timeout=120)

            for prompt in prompts(3, "warm"):  # both servers answer before the freeze
                for backend in (Backend.MLX, Backend.LLAMACPP):
                    warm = job(prompt, backend)
                    if not warm.ok or warm.backend is not backend:
                        raise RuntimeError(f"warm-up on {backend.value} failed: {warm.error}")
            with httpx.Client() as http:
                _direct_first_token(http, llama_url, "warm the connection", max_tokens)
                direct = [_direct_first_token(http, llama_url, p, max_tokens) for p in prompts(direct_n, "direct")]
            os.kill(mlx_server, signal.SIGSTOP)
            try:
                measured = []
                for prompt in prompts(samples, "failover"):
                    circuit.close(Backend.MLX)  # closed again: this job meets the frozen server
                    measured.append(_breakdown(job(prompt)))
                    time.sleep(0.05)
            finally:
                os.kill(mlx_server, signal.SIGCONT)
    ok = [m for m in measured if m["failed_over"]]
    report.results = {
        "samples": measured,
        "failed_over": len(ok),
        "failover": latency_ms([m["failover_s"] for m in ok]),
        "detection": latency_ms([m["detection_s"] for m in ok]),
        "handoff": latency_ms([m["handoff_s"] for m in ok]),
        "llama_first_token": latency_ms([m["llama_ttft_s"] for m in ok]),
        "direct_llama_first_token": latency_ms(direct),
    }
    r = report.results
    rows = [
        _row("deadline to first token on llama.cpp (failover)", r["failover"]),
        _row("- deadline to the mlx attempt's end (detection)", r["detection"]),
        _row("- mlx attempt's end to llama.cpp attempt's start (reroute)", r["handoff"]),
        _row("- llama.cpp attempt's start to first token", r["llama_first_token"]),
        _row("direct streamed call to the same llama.cpp server: first token", r["direct_llama_first_token"]),
    ]
    report.table(
        f"Failover in ms ({len(ok)} of {samples} jobs failed over; mlx first-token timeout "
        f"{FIRST_TOKEN_TIMEOUT_S * 1000:.0f} ms)",
        ["what", "n", "p50", "p95", "p99", "max"],
        rows,
    )
    report.target(
        "failover p50, beyond the deadline", f"< {TARGET_MS:.0f} ms", r["failover"]["p50_ms"], "ms", _under(TARGET_MS)
    )
    report.target(
        "failover max, beyond the deadline", f"< {TARGET_MS:.0f} ms", r["failover"]["max_ms"], "ms", _under(TARGET_MS)
    )
    if len(ok) < samples:
        report.notes.append(f"{samples - len(ok)} job(s) did not fail over: see results.samples for their attempts.")
    if binary is None:
        report.notes.append("No llama-server binary was found: the llama.cpp worker ran python -m llama_cpp.server.")
    return report


def _under(limit: float) -> Any:
    return lambda value: value < limit


def _row(label: str, stats: dict[str, float]) -> list[str]:
    return [label, str(int(stats["n"])), *(num(stats[k], 1) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))]


def _breakdown(result: GenerationResult) -> dict[str, Any]:
    attempts = [a.model_dump(mode="json") for a in result.attempts]
    first, last = (result.attempts[0], result.attempts[-1]) if result.attempts else (None, None)
    failed_over = (
        result.ok
        and result.backend is Backend.LLAMACPP
        and first is not None
        and last is not None
        and first.backend is Backend.MLX
        and first.outcome is AttemptOutcome.TIMEOUT
        and result.timings.first_token_at is not None
    )
    out: dict[str, Any] = {"job_id": result.job_id, "state": result.state.value, "attempts": attempts}
    out["failed_over"] = failed_over
    if not failed_over or first is None or last is None or result.timings.first_token_at is None:
        return out
    deadline = first.started_at + timedelta(seconds=FIRST_TOKEN_TIMEOUT_S)
    mlx_end = first.started_at + timedelta(seconds=first.duration_s)
    first_token = result.timings.first_token_at
    out |= {
        "failover_s": (first_token - deadline).total_seconds(),
        "detection_s": (mlx_end - deadline).total_seconds(),
        "handoff_s": (last.started_at - mlx_end).total_seconds(),
        "llama_ttft_s": (first_token - last.started_at).total_seconds(),
    }
    return out


def _direct_first_token(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> float:
    """Time to the first streamed token of a request sent straight to the llama.cpp server."""
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "repeat_penalty": 1.0}
    started = time.perf_counter()
    with http.stream("POST", url + "/v1/completions", json=payload, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if any(c.get("text") for c in chunk.get("choices") or ()):
                return time.perf_counter() - started
    raise RuntimeError("llama.cpp streamed no token")
