"""Batch defects of issue #10 on real parts: a private redis-server, `genq batch run` and `genq dlq
replay` as subprocesses, a real mlx worker where jobs must run, the broker's own consumer where a
test must decide in which order jobs finish.

Each failed before its fix: a repeated custom_id left a batch in flight forever, and a dead letter
replayed while its batch ran ended the batch `completed` without another line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys, queue_name
from jobcontract.models import Backend, Lane
from jobcontract.settings import GenqSettings
from tests.callers import batch_line, genq_env, job_starts, read_jsonl, write_jsonl
from tests.harness import WorkerHandle, start_worker

BATCH_QUEUE = queue_name("tiny", Backend.MLX, Lane.BATCH)


@pytest.fixture(scope="module")
def served(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    """A namespace with a real worker; tests that finish jobs by hand use their own namespace."""
    return GenqSettings(redis_url=redis_server.url, namespace=f"d{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def worker(served: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(served, tmp_path_factory.mktemp("batch-defects-worker"), concurrency=4)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def db(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    yield client
    client.close()


def genq(settings: GenqSettings, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genq", *args], env=genq_env(settings), capture_output=True, text=True, timeout=timeout
    )


def batch_status(settings: GenqSettings, batch_id: str) -> dict[str, Any]:
    shown = genq(settings, "batch", "status", batch_id)
    assert shown.returncode == 0, shown.stderr
    status: dict[str, Any] = json.loads(shown.stdout)
    return status


def test_a_repeated_custom_id_is_an_invalid_line_and_the_batch_ends(
    worker: WorkerHandle, served: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    lines: list[Any] = [
        batch_line("c0"),
        batch_line("c1"),
        batch_line("c1"),  # repeats a valid line, the same request
        batch_line("c2"),
        batch_line("c2", prompt="another request"),  # repeats a valid line, another request
        "not json at all",
        batch_line("c3", max_tokens=-1),  # invalid, so c3 is still free
        batch_line("c3"),
        batch_line("c0", max_tokens=-1),  # repeats a valid line's custom_id among invalid lines
        batch_line("c4"),
    ]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    args = ["batch", "run", str(source), "-o", str(output), "--errors", str(errors), "--skip-invalid", "--no-progress"]
    done = genq(served, *args)  # it never returned before: one line counted in flight for good
    assert done.returncode == 0, done.stderr

    written = read_jsonl(output)
    assert Counter(line["custom_id"] for line in written) == Counter(f"c{i}" for i in range(5))
    assert all(line["error"] is None for line in written)
    refused = {line["error"]["line"]: line["error"]["message"] for line in read_jsonl(errors)}
    assert sorted(refused) == [3, 5, 6, 7, 9]
    assert "appears more than once" in refused[3] and "appears more than once" in refused[5]

    batch_id = batch_id_of(done.stderr)
    status = batch_status(served, batch_id)
    assert status["status"] == "completed"
    counts = (status["total"], status["submitted"], status["completed"], status["invalid"], status["in_flight"])
    assert counts == (5, 5, 5, 5, 0)
    keys = Keys(served.namespace)
    batch_jobs = {j.decode() for j in db.hkeys(keys.batch_jobs(batch_id))}
    assert len(batch_jobs) == 5
    starts = job_starts(db, keys)
    assert all(starts[job] == 1 for job in batch_jobs)
    texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in written}
    again = genq(served, *args)  # a rerun of the finished batch writes nothing again
    assert again.returncode == 0, again.stderr
    assert {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in read_jsonl(output)} == texts
    assert len(read_jsonl(errors)) == 5


def test_a_batch_longer_than_the_queue_bound_is_queued_in_pieces_that_fit(
    worker: WorkerHandle, served: GenqSettings, tmp_path: Path
) -> None:
    # A list is admitted whole or not at all, so the runner must not ask for more than fits.
    bounded = served.model_copy(update={"max_queued_jobs": 3})
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"q{i}", max_tokens=4) for i in range(10)])
    output = tmp_path / "out.jsonl"
    done = genq(bounded, "batch", "run", str(source), "-o", str(output), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert Counter(line["custom_id"] for line in read_jsonl(output)) == Counter(f"q{i}" for i in range(10))


def batch_id_of(stderr: str) -> str:
    """The id from the runner's own `batch ID: ...` line."""
    found = re.search(r"^batch ([\w.-]+): ", stderr, re.MULTILINE)
    assert found, stderr
    return found.group(1)
