"""Test harness: a private redis-server per session (never the shared 6379), one namespace per test,
the tiny model built once, and real genq workers started as subprocesses."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from genq.local_redis import LocalRedis
from genq.tiny_model import ensure_tiny_model
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import WorkerHandle, start_worker

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.reliability_figures", "tests.process_guard"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak variants of the fault tests")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def redis_client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    ensure_tiny_model(directory)
    return directory


@pytest.fixture
def settings(redis_server: LocalRedis, namespace: str, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=namespace, models_dir=models_dir)


@pytest.fixture
def client(settings: GenqSettings) -> Iterator[Client]:
    """A Python client on this test's Redis namespace."""
    with Client(settings) as c:
        yield c


@pytest.fixture
def mlx_worker(settings: GenqSettings, tmp_path: Path) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, tmp_path, backend="mlx")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def llama_server_binary() -> str:
    """The C++ llama-server: from GENQ_TEST_LLAMA_SERVER (make test sets it) or built (cached) by ops/."""
    given = os.environ.get("GENQ_TEST_LLAMA_SERVER")
    if given:
        return given
    built = subprocess.run([str(REPO / "ops" / "build_llama_server.sh")], check=True, capture_output=True, text=True)
    return built.stdout.strip().splitlines()[-1]
