"""`genq batch` on real parts: a private redis-server, a real mlx worker on the tiny model, and the
CLI as a subprocess (killed half way, resumed, watched and cancelled from another process)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from producer.batch.sources import file_source
from producer.batch.validation import validate
from tests.callers import batch_line, genq_env, job_keys, job_starts, read_jsonl, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=f"b{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, tmp_path_factory.mktemp("batch-worker"), concurrency=4)
    yield handle
    handle.stop()


@pytest.fixture
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


def genq(settings: GenqSettings, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genq", *args],
        env=genq_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_genq(settings: GenqSettings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "genq", *args],
        env=genq_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def batch_id_of(stderr: str) -> str:
    """The id from the runner's own `batch ID: ...` line (log lines from elsewhere may mention batches)."""
    found = re.search(r"^batch ([\w.-]+): ", stderr, re.MULTILINE)
    assert found, stderr
    return found.group(1)


def test_malformed_lines_are_reported_by_number_and_nothing_is_queued(
    settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.namespace)
    before = job_keys(db, keys)
    batches_before = db.zcard(keys.batches)
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            batch_line("ok-1"),
            "{this is not json",
            {**batch_line("bad-url"), "url": "/v1/embeddings"},
            batch_line("bad-model", model="gpt-17"),
            batch_line("bad-param", logprobs=3),
            batch_line("ok-1"),  # a custom_id seen before
            batch_line("too-long", max_tokens=10**6),
            {"custom_id": "no-body", "method": "POST", "url": "/v1/completions"},
        ],
    )
    done = genq(settings, "batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--no-progress")
    assert done.returncode == 2, done.stderr
    for number, words in [
        (2, "not valid JSON"),
        (3, "url"),
        (4, "unknown model 'gpt-17'"),
        (5, "unsupported parameter 'logprobs'"),
        (6, "custom_id 'ok-1' appears more than once"),
        (7, "over this deployment's cap"),
        (8, "body"),
    ]:
        assert f"line {number}: " in done.stderr and words in done.stderr, (number, done.stderr)
    assert "line 1:" not in done.stderr
    assert "7 invalid line(s); nothing was queued" in done.stderr
    assert job_keys(db, keys) == before
    assert db.zcard(keys.batches) == batches_before
    assert not (tmp_path / "out.jsonl").exists()


def test_a_batch_runs_to_openai_output_and_skips_invalid_lines_when_asked(
    worker: WorkerHandle, settings: GenqSettings, tmp_path: Path
) -> None:
    lines = [batch_line(f"c{i}", chat=i % 2 == 0) for i in range(12)]
    source = write_jsonl(tmp_path / "in.jsonl", [*lines[:5], "not json at all", *lines[5:]])
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = genq(settings, "batch", "run", str(source), "-o", str(output), "--errors", str(errors), "--skip-invalid")
    assert done.returncode == 0, done.stderr
    written = read_jsonl(output)
    assert sorted(line["custom_id"] for line in written) == sorted(f"c{i}" for i in range(12))
    for line in written:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        chat = int(line["custom_id"][1:]) % 2 == 0
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str) and text
        assert 0 < body["usage"]["completion_tokens"] <= 16
    [invalid] = read_jsonl(errors)
    assert invalid["response"] is None and "line 6" in invalid["error"]["message"]

    # Status from another terminal; a rerun of a finished batch writes nothing again.
    batch_id = batch_id_of(done.stderr)
    status = json.loads(genq(settings, "batch", "status", batch_id).stdout)
    assert status["status"] == "completed"
    assert (status["total"], status["completed"], status["invalid"], status["in_flight"]) == (12, 12, 1, 0)
    again = genq(settings, "batch", "run", str(source), "-o", str(output), "--errors", str(errors), "--skip-invalid")
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(output)) == 12 and len(read_jsonl(errors)) == 1


def test_a_batch_killed_half_way_resumes_with_each_line_generated_and_written_once(
    worker: WorkerHandle, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    total = 60
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"k{i}", max_tokens=96) for i in range(total)])
    output = tmp_path / "out.jsonl"
    args = ["batch", "run", str(source), "-o", str(output), "--no-progress", "--max-in-flight", "12"]
    first = start_genq(settings, *args)
    try:
        wait_for(lambda: len(read_jsonl(output)) >= 8, timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    written_before = len(read_jsonl(output))
    assert written_before < total, "the batch finished before the kill: nothing was resumed"
    done = genq(settings, *args)
    assert done.returncode == 0, done.stderr
    ids = [line["custom_id"] for line in read_jsonl(output)]
    assert Counter(ids) == Counter(f"k{i}" for i in range(total))
    batch_id = batch_id_of(done.stderr)
    keys = Keys(settings.namespace)
    batch_jobs = {j.decode() for j in db.hkeys(keys.batch_jobs(batch_id))}
    assert len(batch_jobs) == total
    starts = job_starts(db, keys)
    assert all(starts[job] == 1 for job in batch_jobs), Counter(starts[job] for job in batch_jobs)


def test_status_and_cancel_from_another_terminal(
    worker: WorkerHandle, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"x{i}", max_tokens=400) for i in range(40)])
    output = tmp_path / "out.jsonl"
    run = start_genq(settings, "batch", "run", str(source), "-o", str(output), "--no-progress")
    try:
        keys = Keys(settings.namespace)

        def running_batch() -> str | None:
            for raw in db.zrevrange(keys.batches, 0, -1):
                fields = db.hgetall(keys.batch(raw.decode()))
                if fields.get(b"input") == str(source.resolve()).encode() and int(fields.get(b"submitted", 0)) > 0:
                    return raw.decode()
            return None

        batch_id = wait_for(running_batch, timeout=60)
        status = json.loads(genq(settings, "batch", "status", batch_id).stdout)
        assert status["status"] == "in_progress" and status["runner_alive"] is True
        assert status["total"] == 40 and status["in_flight"] > 0
        cancelled = genq(settings, "batch", "cancel", batch_id)
        assert cancelled.returncode == 0, cancelled.stderr
        _out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, err
    final = json.loads(genq(settings, "batch", "status", batch_id).stdout)
    assert final["status"] == "cancelled" and final["in_flight"] == 0
    assert final["cancelled"] > 0
    written = read_jsonl(output) + read_jsonl(tmp_path / "out.errors.jsonl")
    assert len(written) == final["submitted"] == len({line["custom_id"] for line in written})
    # Jobs still queued at the cancel never ran.
    starts = job_starts(db, keys)
    never_ran = [
        line
        for line in written
        if line["error"] and line["error"]["code"] == "cancelled" and starts[line["response"]["request_id"]] == 0
    ]
    assert never_ran, "no queued job was cancelled before it ran"
    assert db.hlen(keys.batch_jobs(batch_id)) == final["submitted"]
    time.sleep(0.5)
    assert json.loads(genq(settings, "batch", "status", batch_id).stdout)["status"] == "cancelled"


def test_validation_streams_the_file_instead_of_holding_it(settings: GenqSettings, tmp_path: Path) -> None:
    """A 20,000-line file of about 11 MB is validated in a few MB: lines are read one at a time."""
    path = tmp_path / "big.jsonl"
    prompt = "lorem ipsum " * 45
    with path.open("w") as handle:
        for i in range(20_000):
            handle.write(json.dumps(batch_line(f"id-{i}", prompt=prompt)) + "\n")
    assert path.stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        result = validate(file_source(path), settings.limits)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.valid, result.invalid) == (20_000, 0)
    assert peak < 4_000_000, f"validation held {peak / 1e6:.1f} MB"
