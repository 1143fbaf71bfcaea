"""Fuzzing the gateway from its own OpenAPI spec with schemathesis, on real parts: a `genq gateway`
subprocess with an API key, a real mlx worker on the tiny model, a private redis-server.

Every generated request (valid and invalid by the spec, on every operation) must get an answer
below 500, and one that gets a 4xx must leave no job behind. The deployment's caps are small
(8 tokens, short prompts) so the valid requests that do generate finish quickly; `--soak` raises
the number of examples per operation. The count of cases run is printed at the end."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import redis
import schemathesis
from schemathesis.checks import not_a_server_error

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, job_keys
from tests.harness import WorkerHandle, start_worker
from tests.security_helpers import start_gateway_process

KEY = f"sk-fuzz-{uuid.uuid4().hex}"
EXAMPLES = 25  # per operation and test; --soak: SOAK_EXAMPLES
SOAK_EXAMPLES = 300
TALLY: Counter[str] = Counter()


def examples() -> int:
    return SOAK_EXAMPLES if "--soak" in sys.argv else EXAMPLES


EXAMPLE_SETTINGS = hypothesis.settings(
    max_examples=examples(),
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)


def gateway_spec() -> dict[str, Any]:
    """The spec the gateway serves at /openapi.json, built from the app without starting it, so the
    operations are known when pytest collects (the served one is checked to be the same)."""
    from producer.gateway.app import create_app
    from producer.gateway.settings import GatewaySettings

    spec: dict[str, Any] = create_app(GatewaySettings()).openapi()
    return spec


SPEC = gateway_spec()
schema = schemathesis.openapi.from_dict(SPEC)
# The same operations with every body's `model` set to a routed one, so generation reaches past
# the model check into the limits, the contract, admission and a real worker. A deadline is kept at
# 30 s or more there: a job that misses a 1 s deadline on a loaded 2-core machine fails (502) as it
# should, and that is the caller's deadline, not the gateway mishandling input.
routed = schemathesis.openapi.from_dict(SPEC)
MIN_ROUTED_TIMEOUT_S = 30.0


@routed.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    if isinstance(body, dict) and "model" in body:
        body = {**body, "model": "tiny"}
        timeout = body.get("timeout_s")
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < MIN_ROUTED_TIMEOUT_S:
            body["timeout_s"] = MIN_ROUTED_TIMEOUT_S
    return body


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=f"z{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, tmp_path_factory.mktemp("fuzz-worker"), concurrency=8)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gateway(
    settings: GenqSettings, worker: WorkerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    env = {
        "GENQ_GATEWAY_API_KEYS": f'[{{"key": "{KEY}", "name": "fuzz", "rate": "unlimited", "max_queued": 50}}]',
        "GENQ_MAX_TOKENS_CAP": "8",
        "GENQ_MAX_PROMPT_CHARS": "400",
        "GENQ_DEFAULT_TIMEOUT_S": "30",
        "GENQ_GATEWAY_MAX_WAIT_S": "1",
        "GENQ_GATEWAY_MAX_BODY_BYTES": "65536",
        "GENQ_GATEWAY_MAX_FILE_BYTES": "65536",
        "GENQ_GATEWAY_MAX_BATCH_LINES": "20",
    }
    handle = start_gateway_process(settings, tmp_path_factory.mktemp("fuzz-gateway"), env)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    total = sum(TALLY.values())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ngateway fuzz: {total} cases run; by status: {dict(sorted(TALLY.items()))}")


def test_the_fuzzed_spec_is_the_one_the_gateway_serves(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/openapi.json", timeout=10).json() == SPEC


@schema.parametrize()
@hypothesis.settings(EXAMPLE_SETTINGS)
def test_no_request_gets_a_5xx_and_a_refused_one_queues_nothing(
    case: schemathesis.Case, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    call_and_check(case, gateway, settings, db)


@routed.parametrize()
@hypothesis.settings(EXAMPLE_SETTINGS)
def test_requests_for_a_routed_model_get_no_5xx_and_a_refused_one_queues_nothing(
    case: schemathesis.Case, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    call_and_check(case, gateway, settings, db)


def call_and_check(case: schemathesis.Case, gateway: Gateway, settings: GenqSettings, db: redis.Redis) -> None:
    keys = Keys(settings.namespace)
    before = job_keys(db, keys)
    response = case.call(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    TALLY[str(response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        created = job_keys(db, keys) - before
        assert not created, f"{case.method} {case.path} answered {response.status_code} but queued {created}"
