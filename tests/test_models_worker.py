"""A worker serving several models on real parts: `genq worker --models` as a subprocess, real
mlx_lm.server processes (one per loaded model) on two tiny models built with different seeds, a
private redis-server, and the worker's record in Redis (jobcontract.protocol.placement) read back
as admission, `genq models` and the gateway read it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis

from genq.local_redis import LocalRedis
from genq.tiny_model import ensure_tiny_model
from genq.worker_env import worker_env
from jobcontract import protocol
from jobcontract.admission import ModelTooLarge
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.models import JobState
from jobcontract.protocol.placement import PublishModels, ReadModels, WithdrawModels, WorkerModels, records_key
from jobcontract.settings import GenqSettings
from producer.batch.validation import BatchModelTooLarge
from producer.client import Client
from tests.callers import start_gateway
from tests.harness import WorkerHandle, start_worker, wait_until

GIB = 1024**3
BIG_BYTES = 64 * GIB  # the "big" model's apparent size on disk: more than any budget here


@pytest.fixture(scope="module")
def routes_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Routes of three models: a (seed 0), b (seed 1), and big (a's weights beside a sparse 64 GiB
    file its size is read from: a model no budget here holds)."""
    root = tmp_path_factory.mktemp("multi")
    second, _gguf = ensure_tiny_model(root / "b", seed=1)
    big = root / "big" / "tiny-llama"
    shutil.copytree(models_dir / "tiny-llama", big)
    with (big / "padding.gguf").open("wb") as padding:
        padding.truncate(BIG_BYTES)
    lines = []
    for name, path in (("a", models_dir / "tiny-llama"), ("b", second), ("big", big)):
        lines += [
            "[[models]]",
            f'name = "{name}"',
            "[[models.backends]]",
            f'path = "{path}"',
            "first_token_timeout_s = 10.0",
            "token_timeout_s = 10.0",
            "context_length = 512",
            "",
        ]
    path = root / "routes.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def settings(redis_server: LocalRedis, models_dir: Path, routes_file: Path) -> GenqSettings:
    return GenqSettings(
        redis_url=redis_server.url,
        namespace=f"m{uuid.uuid4().hex[:10]}",
        models_dir=models_dir,
        routes_file=routes_file,
    )


@pytest.fixture
def client(settings: GenqSettings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def fleet(settings: GenqSettings) -> list[WorkerModels]:
    redis_client = connect(settings.redis_url)
    try:
        return protocol.run(redis_client, ReadModels(Keys(settings.namespace)))
    finally:
        redis_client.close()


def multi_worker(
    settings: GenqSettings, log_dir: Path, models: str, *, budget_gb: float, keep_alive_s: float
) -> WorkerHandle:
    """`genq worker --models ...`, ready once its process has published its record."""
    extra = ["--models", models, "--memory-budget-gb", str(budget_gb), "--keep-alive", str(keep_alive_s)]
    handle = start_worker(settings, log_dir, concurrency=4, extra_args=extra, wait=False)
    try:
        if not wait_until(lambda: len(fleet(settings)) == 1, timeout=120, interval=0.2):
            raise TimeoutError(f"the worker published no record:\n{handle.log()}")
    except BaseException:
        handle.stop(timeout=10)
        raise
    return handle


def holds(settings: GenqSettings, *models: str) -> bool:
    """Whether the one worker's record says it holds exactly these models, within 2 s: it is published
    when what it says changes (an unchanged one is renewed every 3.3 s, which must not be what shows a
    load)."""
    return wait_until(lambda: fleet(settings)[0].loaded == models, timeout=2, interval=0.1)


def run_jobs(client: Client, model: str, n: int = 2) -> list[str]:
    ids = client.submit_many([{"model": model, "prompt": f"Once upon a time {i}", "max_tokens": 6} for i in range(n)])
    results = client.results(ids, timeout=120)
    assert all(r.state is JobState.SUCCEEDED for r in results), [r.error for r in results]
    assert {r.model for r in results} == {model}
    return [r.text or "" for r in results]


def server_of(handle: WorkerHandle, model_dir: str) -> int | None:
    """The pid of the server loaded with the model folder `model_dir`."""
    for pid in handle.server_pids():
        try:
            if model_dir in psutil.Process(pid).cmdline():
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def servers_rss(handle: WorkerHandle) -> int:
    total = 0
    for pid in handle.server_pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def test_worker_records_hold_until_their_ttl_and_go_when_withdrawn(redis_client: redis.Redis, keys: Keys) -> None:
    def record(name: str) -> WorkerModels:
        return WorkerModels(worker=name, host="h", backend="mlx", budget_bytes=GIB, serves=("a",), loaded=("a",))

    assert protocol.run(redis_client, PublishModels(keys, record("w1"), ttl_ms=60_000)) == 0
    protocol.run(redis_client, PublishModels(keys, record("w2"), ttl_ms=1))
    assert wait_until(lambda: protocol.run(redis_client, ReadModels(keys)) == [record("w1")])
    assert protocol.run(redis_client, PublishModels(keys, record("w1"), ttl_ms=60_000)) == 1  # w2 dropped for good
    assert redis_client.hlen(records_key(keys)) == 1
    assert protocol.run(redis_client, WithdrawModels(keys, ["w1"])) == 1
    assert protocol.run(redis_client, ReadModels(keys)) == []


def test_one_worker_serves_jobs_of_two_models_and_unloads_them_after_the_keep_alive(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    worker = multi_worker(settings, tmp_path, "a,b", budget_gb=4, keep_alive_s=3)
    try:
        [record] = fleet(settings)
        assert record.serves == ("a", "b") and record.loaded == () and record.budget_bytes == 4 * GIB
        ids = client.submit_many(
            [{"model": m, "prompt": f"Once upon a time {i}", "max_tokens": 6} for i in range(6) for m in ("a", "b")]
        )
        results = client.results(ids, timeout=120)
        assert all(r.state is JobState.SUCCEEDED for r in results), [r.error for r in results]
        texts = {m: {r.text for r in results if r.model == m} for m in ("a", "b")}
        assert texts["a"] != texts["b"]  # two models (other seeds), each job on its own
        assert len(worker.server_pids()) <= 2
        listed = subprocess.run(
            [sys.executable, "-m", "genq", "models", "--json"],
            env=worker_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        shown = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [w["serves"] for w in shown] == [["a", "b"]]
        table = subprocess.run(
            [sys.executable, "-m", "genq", "models"],
            env=worker_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert shown[0]["worker"] in table and "4.00G" in table  # the worker and its budget
        # Idle past the keep-alive: both unloaded, their servers gone.
        assert wait_until(lambda: fleet(settings)[0].loaded == (), timeout=30, interval=0.2), fleet(settings)
        assert wait_until(lambda: not worker.server_pids(), timeout=10)
        assert run_jobs(client, "a", 1)  # loaded again on demand
    finally:
        worker.stop()


def test_a_budget_for_one_model_swaps_and_a_model_over_every_budget_is_refused_at_the_door(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    # One tiny mlx_lm.server measures about 0.1 GiB resident here; 0.15 GiB holds one, not two.
    budget = 0.15
    worker = multi_worker(settings, tmp_path, "a,b,big", budget_gb=budget, keep_alive_s=600)
    gateway = None
    try:
        run_jobs(client, "a")
        assert holds(settings, "a"), fleet(settings)
        size_a = fleet(settings)[0].sizes["a"]
        assert budget * GIB / 2 < size_a <= budget * GIB  # measured: one fits, two do not
        run_jobs(client, "b")
        assert holds(settings, "b"), fleet(settings)  # a made room for b
        assert servers_rss(worker) <= budget * GIB
        run_jobs(client, "a")
        assert holds(settings, "a"), fleet(settings)
        assert servers_rss(worker) <= budget * GIB
        assert len(worker.server_pids()) == 1
        # Mixed at once: the model generating is drained for the other, none waits forever.
        mixed = client.submit_many(
            [{"model": m, "prompt": f"mixed {i}", "max_tokens": 16} for i in range(6) for m in ("a", "b")]
        )
        results = client.results(mixed, timeout=180)
        assert all(r.ok for r in results), [r.error for r in results]
        assert len(worker.server_pids()) <= 1

        with pytest.raises(ModelTooLarge) as refused:
            client.submit({"model": "big", "prompt": "x", "max_tokens": 2})
        assert refused.value.model == "big" and refused.value.size_bytes >= BIG_BYTES
        assert refused.value.largest_budget_bytes == int(budget * GIB)

        gateway = start_gateway(settings, tmp_path)
        answer = httpx.post(
            f"{gateway.url}/v1/completions", json={"model": "big", "prompt": "x", "max_tokens": 2}, timeout=30
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_too_large" and error["param"] == "model"
        assert "'big'" in error["message"] and str(int(budget * GIB)) in error["message"]
        listed = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"]
        by_id = {m["id"]: m for m in listed}
        record = fleet(settings)[0]
        # One fits the budget: whichever the mixed jobs left loaded. (The record once said none here: a
        # load was published before it counted, and seen only at the renewal 3.3 s later.)
        (held,) = record.loaded
        other = "b" if held == "a" else "a"
        assert by_id[held]["loaded_on"] == [record.worker] and by_id[other]["loaded_on"] == [], (listed, record)
        assert by_id["big"]["served_by"] == [fleet(settings)[0].worker]
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def test_a_server_killed_under_its_jobs_raises_its_models_recorded_size_and_its_jobs_still_finish(
    settings: GenqSettings, client: Client, tmp_path: Path, models_dir: Path
) -> None:
    worker = multi_worker(settings, tmp_path, "a,b", budget_gb=2, keep_alive_s=600)
    try:
        run_jobs(client, "b", 1)  # b is loaded: a will die beside it
        ids = client.submit_many([{"model": "a", "prompt": f"Once {i}", "max_tokens": 400} for i in range(8)])
        a_dir = str(models_dir / "tiny-llama")

        def generating() -> bool:
            """A job runs (or waits for a's load: a kill then hits the load, which counts the same)."""
            states = [client.status(i).state for i in ids]
            return server_of(worker, a_dir) is not None and JobState.RUNNING in states

        assert wait_until(generating, timeout=60, interval=0.01)
        assert fleet(settings)[0].sizes["a"] < 2 * GIB
        pid = server_of(worker, a_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: fleet(settings)[0].sizes["a"] == 2 * GIB, timeout=30, interval=0.2), fleet(settings)
        results = client.results(ids, timeout=120)
        assert all(r.ok for r in results), [r.error for r in results]  # retried, a loaded again
        run_jobs(client, "a", 1)
        assert holds(settings, "a"), fleet(settings)  # a counts as the whole budget now: b made room
    finally:
        worker.stop()


def test_a_batch_with_a_line_for_a_model_no_worker_can_hold_fails_before_anything_is_queued(
    settings: GenqSettings, client: Client, tmp_path: Path
) -> None:
    """Checked for the whole file up front, as admission checks one request: before, the file run
    raised half way through and a gateway batch was taken up again and again, in progress for ever."""
    worker = multi_worker(settings, tmp_path, "a,big", budget_gb=0.15, keep_alive_s=600)
    gateway = None
    try:
        lines = [
            {"custom_id": f"c{n}", "method": "POST", "url": "/v1/completions", "body": {"model": m, "prompt": "x"}}
            for n, m in enumerate(["a", "a", "big", "a"])
        ]
        path = tmp_path / "input.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        queued_before = queued(settings)
        with pytest.raises(BatchModelTooLarge) as refused:
            client.batch(path, tmp_path / "output.jsonl")
        assert refused.value.line == 3 and refused.value.refused.model == "big"
        assert queued(settings) == queued_before and not (tmp_path / "output.jsonl").exists()

        gateway = start_gateway(settings, tmp_path)
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
        upload = sdk.files.create(file=path.open("rb"), purpose="batch")
        batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        assert wait_until(lambda: sdk.batches.retrieve(batch.id).status == "failed", timeout=60, interval=0.2), (
            sdk.batches.retrieve(batch.id)
        )
        failed = sdk.batches.retrieve(batch.id)
        assert failed.errors is not None and failed.errors.data is not None
        (error,) = failed.errors.data
        assert error.code == "model_too_large" and error.line == 3 and error.message and "'big'" in error.message
        assert queued(settings) == queued_before
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def queued(settings: GenqSettings) -> int:
    """Entries ever added to any of the namespace's queue streams."""
    redis_client = connect(settings.redis_url)
    try:
        streams = redis_client.keys(f"{settings.namespace}:*")
        return sum(
            int(redis_client.xinfo_stream(s)["entries-added"]) for s in streams if redis_client.type(s) == b"stream"
        )
    finally:
        redis_client.close()
