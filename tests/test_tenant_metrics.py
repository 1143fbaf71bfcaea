"""Metrics name the tenant, never the key, on real parts: a private redis-server, a real mlx worker
serving /metrics, a `genq gateway` with two tenants' API keys, the Python client for a job without
a tenant. The gateway counts requests per tenant (`none` before a key is accepted); the worker
counts jobs, tokens and latencies per tenant, gateway batch jobs under their batch's tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from genq.local_redis import LocalRedis
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.callers import Gateway, batch_line, start_gateway, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker
from tests.metrics_helpers import Samples, free_port, scrape, value
from tests.security_helpers import as_caller, tenant_keys_env

ALICE = f"sk-alice-{uuid.uuid4().hex}"
BOB = f"sk-bob-{uuid.uuid4().hex}"
KEY_ENTRIES: list[dict[str, Any]] = [{"key": ALICE, "name": "alice"}, {"key": BOB, "name": "bob"}]
ASK = {"model": "tiny", "prompt": "metrics per tenant", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def settings(models_dir: Path) -> Iterator[GenqSettings]:
    with LocalRedis() as local:
        yield GenqSettings(redis_url=local.url, namespace=f"m{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenant-metrics")


@pytest.fixture(scope="module")
def worker_port(settings: GenqSettings, log_dir: Path) -> Iterator[int]:
    port = free_port()
    handle: WorkerHandle = start_worker(settings, log_dir, concurrency=4, extra_args=["--metrics-port", str(port)])
    try:
        yield port
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def gateway(settings: GenqSettings, log_dir: Path) -> Iterator[Gateway]:
    handle = start_gateway(settings, log_dir, **tenant_keys_env(KEY_ENTRIES))
    try:
        yield handle
    finally:
        handle.stop()


def completions(gateway: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/completions", json=ASK, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def test_requests_jobs_tokens_and_latencies_are_counted_per_tenant(
    worker_port: int, gateway: Gateway, settings: GenqSettings, tmp_path: Path
) -> None:
    assert completions(gateway, ALICE).status_code == 200
    for _ in range(2):
        assert completions(gateway, BOB).status_code == 200
    assert completions(gateway, "sk-nobody").status_code == 401
    alice = as_caller(gateway, ALICE)
    file_id = alice.files.create(
        file=write_jsonl(tmp_path / "in.jsonl", [batch_line("r0")]).open("rb"), purpose="batch"
    )
    batch = alice.batches.create(input_file_id=file_id.id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: alice.batches.retrieve(batch.id).status == "completed", 120)
    with Client(settings) as client:
        assert client.generate(ASK, timeout=120).ok

    front = scrape(gateway.url + "/metrics")
    completed = {"route": "/v1/completions", "status": "200"}
    assert value(front, "genq_gateway_requests_total", tenant="alice", **completed) == 1
    assert value(front, "genq_gateway_requests_total", tenant="bob", **completed) == 2
    assert value(front, "genq_gateway_requests_total", tenant="none", status="401") == 1
    assert value(front, "genq_gateway_request_duration_seconds_count", tenant="bob", route="/v1/completions") == 2
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert ALICE not in text and BOB not in text and "sk-" not in text, "an API key became a label"

    def jobs(samples: Samples, tenant: str) -> float:
        return value(samples, "genq_jobs_total", tenant=tenant, outcome="succeeded")

    back = wait_for(lambda: (s := scrape(f"http://127.0.0.1:{worker_port}/metrics")) and jobs(s, "default") >= 1 and s)
    assert jobs(back, "alice") == 2, "the batch's job counts under its batch's tenant"
    assert jobs(back, "bob") == 2
    assert jobs(back, "default") == 1, "a job without a tenant (the Python client) counts as default"
    assert {labels for (name, labels) in back if name == "genq_jobs_total"} <= {
        frozenset({("model", "tiny"), ("backend", "mlx"), ("tenant", t), ("outcome", o)})
        for t in ("alice", "bob", "default")
        for o in ("succeeded", "failed", "cancelled", "dead_lettered", "rerouted")
    }
    for tenant, count in (("alice", 2), ("bob", 2), ("default", 1)):
        assert value(back, "genq_end_to_end_latency_seconds_count", tenant=tenant) == count
        assert value(back, "genq_queue_wait_seconds_count", tenant=tenant) == count
        assert value(back, "genq_completion_tokens_total", tenant=tenant) > 0
