"""Metrics that match what happened: real jobs on real mlx and llama.cpp workers (some succeeding,
one rerouted after its servers froze, one failing), scraped from the workers' --metrics-port
endpoints; the cluster collector on a real Redis; the gateway middleware on a real HTTP server."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.broker import StreamsBroker
from jobcontract.keys import Keys, pool_name, queue_name
from jobcontract.models import Backend, GenerationResult, JobState, Lane
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import WorkerHandle, start_worker, wait_until
from tests.metrics_helpers import Samples, free_port, gateway_app, scrape, serving, value
from tests.queues import partition_streams
from workers.circuit import CircuitBreaker

# -- the cluster collector, on a real Redis with no worker ----------------------------------------------


def test_the_collector_reports_depth_age_pools_circuits_and_dead_letters(
    redis_server: LocalRedis, settings: GenqSettings, keys: Keys, redis_client: redis.Redis
) -> None:
    from workers.cluster_metrics import build_registry

    with Client(settings) as client:
        # One prompt_cache_key: one prefix shard, so the three wait in one partition, in order.
        client.submit_many(
            [{"model": "tiny", "prompt": f"p{n}", "max_tokens": 4, "prompt_cache_key": "k"} for n in range(3)]
        )
        # No mlx worker is live, so admission picks the first backend of the route: mlx.
    queue = queue_name("tiny", Backend.MLX, Lane.INTERACTIVE)
    broker = StreamsBroker(redis_client, keys, consumer_name="probe")
    broker.declare_queue(queue)
    time.sleep(0.3)
    # One entry delivered (a worker took it and has not acked it): two still wait.
    (partition,) = [s for s in partition_streams(redis_client, keys, queue) if redis_client.xlen(s)]
    first = redis_client.xreadgroup("genq", "probe", {partition: ">"}, count=1)
    assert first
    second_id = redis_client.xrange(partition, "-", "+", count=2)[1][0].decode()
    redis_client.zadd(keys.pool(pool_name("tiny", Backend.LLAMACPP)), {"w1": 1e18, "w2": 1e18, "gone": 1})
    breaker = CircuitBreaker(redis_client, keys, "tiny", threshold=2, cool_down_s=60)
    breaker.record_failure(Backend.MLX)
    breaker.record_failure(Backend.MLX)
    redis_client.xadd(keys.dead_letters, {"m": b"x", "queue": queue, "reason": "test"})
    redis_client.xadd(keys.stream(queue + ".DQ"), {"m": b"x", "r": 0})

    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in build_registry(settings).collect()
        for s in family.samples
    }
    here = {"model": "tiny", "backend": "mlx", "lane": "interactive"}
    assert value(samples, "genq_redis_up") == 1
    assert value(samples, "genq_queue_jobs", **here, state="waiting") == 2
    assert value(samples, "genq_queue_jobs", **here, state="delivered") == 1
    assert value(samples, "genq_queue_jobs", **here, state="delayed") == 1
    seconds, micros = redis_client.time()
    expected_age = (seconds * 1000 + micros // 1000 - int(second_id.split("-")[0])) / 1000
    age = value(samples, "genq_queue_oldest_age_seconds", **here)
    assert 0.3 <= age <= expected_age + 0.01, (age, expected_age)
    assert abs(age - expected_age) < 0.5
    assert value(samples, "genq_pool_workers", model="tiny", backend="llamacpp") == 2  # "gone" expired
    assert value(samples, "genq_pool_workers", model="tiny", backend="mlx") == 0
    assert value(samples, "genq_circuit_open", model="tiny", backend="mlx") == 1
    assert value(samples, "genq_circuit_open", model="tiny", backend="llamacpp") == 0
    assert value(samples, "genq_dead_letters") == 1
    # An empty queue waits for nothing.
    batch = {"model": "tiny", "backend": "mlx", "lane": "batch"}
    if ("genq_queue_oldest_age_seconds", frozenset(batch.items())) in samples:
        assert value(samples, "genq_queue_oldest_age_seconds", **batch) == 0


def test_the_collector_says_so_when_redis_is_down(models_dir: Path) -> None:
    from workers.cluster_metrics import build_registry

    settings = GenqSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", models_dir=models_dir)
    names = {s.name: s.value for family in build_registry(settings).collect() for s in family.samples}
    assert names == {"genq_redis_up": 0}


# -- real workers: what the endpoints say matches what the results say --------------------------------


ROUTES = """
[[models]]
name = "tiny"

[[models.backends]]
path = "{models}/tiny-llama"
first_token_timeout_s = 1.0
token_timeout_s = 1.0
max_attempts = 2
context_length = 512

[[models.backends]]
path = "{models}/tiny-llama.gguf"
first_token_timeout_s = 20.0
token_timeout_s = 20.0
context_length = 512
"""


class Pools:
    def __init__(self, settings: GenqSettings, mlx: WorkerHandle, llamacpp: WorkerHandle, ports: dict[str, int]):
        self.settings = settings
        self.mlx = mlx
        self.llamacpp = llamacpp
        self.ports = ports

    def scrape(self, backend: str) -> Samples:
        return scrape(f"http://127.0.0.1:{self.ports[backend]}/metrics")


@pytest.fixture(scope="module")
def pools(redis_server: LocalRedis, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    directory = tmp_path_factory.mktemp("metrics")
    routes = directory / "routes.toml"
    routes.write_text(ROUTES.format(models=models_dir))
    settings = GenqSettings(
        redis_url=redis_server.url, namespace=f"tm{os.getpid()}", models_dir=models_dir, routes_file=routes
    )
    ports = {"mlx": free_port(), "llamacpp": free_port()}
    llama_bin = os.environ.get("GENQ_TEST_LLAMA_SERVER")
    # Two mlx processes: the endpoint must sum them. Two slots each, so eight jobs spread over both.
    with ExitStack() as started:  # both stopped whichever step fails
        mlx_args = ["--metrics-port", str(ports["mlx"])]
        mlx = start_worker(settings, directory, processes=2, concurrency=2, wait=False, extra_args=mlx_args)
        started.callback(mlx.stop)
        llamacpp = start_worker(
            settings,
            directory,
            backend="llamacpp",
            concurrency=2,
            wait=False,
            extra_args=[
                "--metrics-port",
                str(ports["llamacpp"]),
                *(["--llama-server", llama_bin] if llama_bin else []),
            ],
        )
        started.callback(llamacpp.stop)
        mlx.wait_ready()
        llamacpp.wait_ready()
        yield Pools(settings, mlx, llamacpp, ports)


def expected_counts(results: list[GenerationResult]) -> dict[str, dict[tuple[str, ...], float]]:
    """What the counters must say, read from each result's own history of attempts."""
    counts: dict[str, dict[tuple[str, ...], float]] = {
        name: {} for name in ("jobs", "attempts", "retries", "reroutes", "ttft", "e2e", "e2e_sum", "completion")
    }

    def add(name: str, key: tuple[str, ...], amount: float = 1) -> None:
        counts[name][key] = counts[name].get(key, 0) + amount

    for result in results:
        attempts = result.attempts
        for attempt in attempts:
            add("attempts", (attempt.backend.value, attempt.outcome.value))
        for before, after in itertools.pairwise(attempts):
            if before.backend is after.backend:
                add("retries", (before.backend.value,))
            else:
                add("reroutes", (before.backend.value, after.backend.value))
                add("jobs", (before.backend.value, "rerouted"))
        last = attempts[-1].backend.value
        if result.state is JobState.SUCCEEDED:
            add("jobs", (last, "succeeded"))
            if result.timings.first_token_at is not None:  # streamed jobs only: a plain one has no first token
                add("ttft", (last,))
            add("e2e", (last,))
            add("e2e_sum", (last,), result.timings.total_s)
            add("completion", (last,), result.usage.completion_tokens)
        else:
            assert result.error is not None
            add("jobs", (last, "dead_lettered" if result.error.retryable else "failed"))
    return counts


def assert_endpoints_match(pools: Pools, results: list[GenerationResult]) -> None:
    expected = expected_counts(results)
    for backend in ("mlx", "llamacpp"):
        samples = pools.scrape(backend)
        pool = {"model": "tiny", "backend": backend}
        for outcome in ("succeeded", "failed", "dead_lettered", "rerouted", "cancelled"):
            assert value(samples, "genq_jobs_total", **pool, outcome=outcome) == expected["jobs"].get(
                (backend, outcome), 0
            ), (backend, outcome)
        for (attempt_backend, outcome), count in expected["attempts"].items():
            if attempt_backend == backend:
                assert value(samples, "genq_attempts_total", **pool, outcome=outcome) == count, (backend, outcome)
        attempts_here = sum(c for (b, _), c in expected["attempts"].items() if b == backend)
        assert value(samples, "genq_attempts_total", **pool) == attempts_here
        assert value(samples, "genq_retries_total", **pool) == expected["retries"].get((backend,), 0)
        for other in ("mlx", "llamacpp"):
            if other != backend:
                reroutes = value(samples, "genq_reroutes_total", model="tiny", from_backend=backend, to_backend=other)
                assert reroutes == expected["reroutes"].get((backend, other), 0)
        # Every attempt that started waited in a queue first; only successes have a first token.
        assert value(samples, "genq_queue_wait_seconds_count", **pool) == attempts_here
        assert value(samples, "genq_time_to_first_token_seconds_count", **pool) == expected["ttft"].get((backend,), 0)
        assert value(samples, "genq_end_to_end_latency_seconds_count", **pool) == expected["e2e"].get((backend,), 0)
        assert value(samples, "genq_generation_seconds_count", **pool) == expected["e2e"].get((backend,), 0)
        assert value(samples, "genq_end_to_end_latency_seconds_sum", **pool) == pytest.approx(
            expected["e2e_sum"].get((backend,), 0), abs=1e-6
        )
        assert value(samples, "genq_completion_tokens_total", **pool) == expected["completion"].get((backend,), 0)
        assert value(samples, "genq_jobs_in_flight", **pool) == 0


def ask(n: int, **extra: object) -> dict[str, object]:
    return {"model": "tiny", "prompt": f"metrics prompt {n}", "max_tokens": 8, "temperature": 0.0, **extra}


def test_counters_and_histograms_match_what_happened(pools: Pools) -> None:
    restarts_before = value(pools.scrape("mlx"), "genq_backend_server_restarts_total")
    frozen = pools.mlx.server_pids()
    assert len(frozen) == 2
    with Client(pools.settings) as client:
        # Both mlx servers frozen: the job times out twice on mlx, then is rerouted to llama.cpp.
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        rerouted = client.generate(ask(0), timeout=90)
        # The workers notice the frozen servers and restart them.
        assert wait_until(
            lambda: (
                value(pools.scrape("mlx"), "genq_backend_server_restarts_total") == restarts_before + 2
                and value(pools.scrape("mlx"), "genq_backend_servers_up") == 2
            ),
            90,
        ), pools.mlx.log()
        # Streamed, so they have first tokens and inter-token gaps (plain jobs record neither).
        # 24: more than one process holds (8 slots + 2), so both serve whichever owns their prefixes.
        succeeded = client.results(client.submit_many([ask(n, stream=True) for n in range(1, 25)]), timeout=120)
        # A deadline that has passed before any worker can start it: the job fails, nothing runs.
        failed = client.generate(ask(9, timeout_s=1e-6), timeout=60)

    assert rerouted.state is JobState.SUCCEEDED, rerouted.error
    assert rerouted.backend is Backend.LLAMACPP
    assert [a.backend for a in rerouted.attempts] == [Backend.MLX, Backend.MLX, Backend.LLAMACPP]
    assert all(r.state is JobState.SUCCEEDED for r in succeeded), [r.error for r in succeeded]
    mlx_workers = {r.worker for r in succeeded if r.backend is Backend.MLX}
    assert len(mlx_workers) == 2, "both mlx processes should have served: the endpoint sums them"
    assert failed.state is JobState.FAILED
    assert failed.error is not None and failed.error.type == "timeout"

    results = [rerouted, *succeeded, failed]
    assert_endpoints_match(pools, results)
    expected = expected_counts(results)
    assert expected["reroutes"] == {("mlx", "llamacpp"): 1}
    assert expected["retries"].get(("mlx",), 0) >= 1
    assert expected["jobs"][("mlx", "failed")] == 1
    mlx = pools.scrape("mlx")
    assert value(mlx, "genq_backend_server_restarts_total") == restarts_before + 2
    assert value(mlx, "genq_prompt_tokens_total", model="tiny", backend="mlx") == sum(
        r.usage.prompt_tokens for r in succeeded if r.backend is Backend.MLX
    )
    assert value(mlx, "genq_prompt_cached_tokens_total", model="tiny", backend="mlx") == sum(
        r.usage.prompt_tokens_details.cached_tokens for r in succeeded if r.backend is Backend.MLX
    )
    assert value(mlx, "genq_inter_token_latency_seconds_count", model="tiny", backend="mlx") > 0
    llamacpp = pools.scrape("llamacpp")
    assert value(llamacpp, "genq_backend_servers_up", model="tiny", backend="llamacpp") == 1


def test_a_dead_worker_process_keeps_its_counts_and_drops_its_gauges(pools: Pools) -> None:
    before = pools.scrape("mlx")
    # A replacement starts its own server: one more load (and load time), not a lost count.
    grows = ("genq_backend_server_restarts_total", "genq_model_loads_total", "genq_model_load_seconds_count")
    counters = {key: v for key, v in before.items() if key[0].endswith(("_total", "_count")) and key[0] not in grows}
    assert value(before, "genq_backend_servers_up") == 2
    victim = pools.mlx.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Replaced, and its replacement's server is up: two live servers, not three.
    assert wait_until(lambda: victim not in pools.mlx.worker_pids() and len(pools.mlx.server_pids()) == 2, 90), (
        pools.mlx.log()
    )
    assert wait_until(lambda: value(pools.scrape("mlx"), "genq_backend_servers_up") == 2, 60)
    after = pools.scrape("mlx")
    assert {key: after.get(key) for key in counters} == counters
    assert value(after, "genq_model_loads_total") == value(before, "genq_model_loads_total") + 1
    # The dead process's loaded gauge is gone; its replacement's says 1 once it publishes.
    assert wait_until(lambda: value(pools.scrape("mlx"), "genq_model_loaded") == 2, 30)
    assert value(after, "genq_jobs_in_flight") == 0
    with Client(pools.settings) as client:
        result = client.generate(ask(20), timeout=60)
    assert result.ok
    assert value(pools.scrape("mlx"), "genq_jobs_total", outcome="succeeded") == value(
        before, "genq_jobs_total", outcome="succeeded"
    ) + (1 if result.backend is Backend.MLX else 0)


# -- the gateway's request metrics, on a real HTTP server ----------------------------------------------


def test_gateway_requests_are_counted_by_route_template_and_status(settings: GenqSettings) -> None:
    with serving(gateway_app(settings), free_port()) as base, httpx.Client(base_url=base) as http:
        for _ in range(3):
            assert http.get("/v1/models").status_code == 200
        for job_id in ("a1b2c3", "d4e5f6"):
            assert http.get(f"/v1/genq/jobs/{job_id}").status_code == 404
        assert http.post("/v1/genq/jobs", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 202
        assert http.post("/v1/genq/jobs", json={"model": "tiny"}).status_code == 400
        assert http.post("/v1/completions", content=b"x" * (8 * 1024 * 1024)).status_code == 413
        assert http.get("/nowhere/at/all").status_code == 404
        samples = scrape(base + "/metrics")
    requests = {
        (dict(labels)["method"], dict(labels)["route"], dict(labels)["status"]): v
        for (name, labels), v in samples.items()
        if name == "genq_gateway_requests_total"
    }
    assert requests == {
        ("GET", "/v1/models", "200"): 3,
        ("GET", "/v1/genq/jobs/{job_id}", "404"): 2,
        ("POST", "/v1/genq/jobs", "202"): 1,
        ("POST", "/v1/genq/jobs", "400"): 1,
        ("POST", "unmatched", "413"): 1,  # refused by the body bound before any route matched
        ("GET", "unmatched", "404"): 1,
    }
    assert value(samples, "genq_gateway_request_duration_seconds_count", route="/v1/models") == 3
    assert value(samples, "genq_gateway_request_duration_seconds_count") == 9  # /metrics itself is not counted
    assert value(samples, "genq_gateway_requests_in_progress") == 0
    assert not any("a1b2c3" in str(labels) for _name, labels in samples)  # ids never become labels
