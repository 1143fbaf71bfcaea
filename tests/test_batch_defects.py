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
from jobcontract.broker import StreamMessage, StreamsBroker, StreamsConsumer
from jobcontract.connection import connect
from jobcontract.keys import Keys, queue_name
from jobcontract.models import Backend, GenerationResult, JobError, JobState, Lane, Timings
from jobcontract.settings import GenqSettings
from producer.batch.lines import CUSTOM_ID
from producer.client import Client
from tests.callers import batch_line, genq_env, job_starts, read_jsonl, wait_for, write_jsonl
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


# -- a dead letter replayed while its batch runs ------------------------------------------------------
class HandWorker:
    """The broker's real consumer on the batch queue, finishing jobs in the order a test chooses."""

    def __init__(self, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
        self.client = client
        broker = StreamsBroker(redis_client, keys, consumer_name="hand", middleware=[])
        broker.declare_queue(BATCH_QUEUE)
        redis_client.set(keys.alive("hand"), 1)
        consumer = broker.consume(BATCH_QUEUE, prefetch=10, timeout=100)
        assert isinstance(consumer, StreamsConsumer)
        self.consumer = consumer

    def take(self, count: int) -> dict[str, StreamMessage]:
        """The next `count` messages, by the custom_id of their line."""
        taken: dict[str, StreamMessage] = {}
        while len(taken) < count:
            message = next(self.consumer)
            if message is not None:
                taken[message.kwargs["request"]["metadata"][CUSTOM_ID]] = message
        return taken

    def finish(self, message: StreamMessage, state: JobState) -> None:
        job_id, batch_id = message.message_id, message.kwargs["batch_id"]
        self.client.store.start(job_id, "hand", Backend.MLX, BATCH_QUEUE)
        status = self.client.status(job_id)
        failed = state is JobState.FAILED
        result = GenerationResult(
            job_id=job_id,
            model="tiny",
            state=state,
            text="" if failed else f"answer of {job_id}",
            finish_reason="error" if failed else "stop",
            metadata=message.kwargs["request"]["metadata"],
            timings=Timings(enqueued_at=status.enqueued_at, finished_at=self.client.store.now()),
            error=JobError(type="connection_error", message="every backend failed") if failed else None,
        )
        self.client.store.finish(result, batch_id)
        if failed:  # what the rerouting middleware does when every try failed: a dead letter
            message.fail()
            message.stuff_exception(RuntimeError("every backend failed"))
            self.consumer.nack(message)
        else:
            self.consumer.ack(message)


def start_batch(settings: GenqSettings, source: Path, output: Path, errors: Path) -> subprocess.Popen[str]:
    command = ["batch", "run", str(source), "-o", str(output), "--errors", str(errors), "--no-progress"]
    return subprocess.Popen(
        [sys.executable, "-m", "genq", *command],
        env=genq_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(runner: subprocess.Popen[str]) -> None:
    if runner.poll() is None:
        runner.kill()
        runner.communicate()


def wait_read_through(
    runner: subprocess.Popen[str], redis_client: redis.Redis, keys: Keys, batch_id: str, output: Path
) -> None:
    """Until the runner has read every finished-job entry there is so far (or it ended)."""
    last = redis_client.xrevrange(keys.batch_done(batch_id), count=1)[0][0].decode()
    checkpoint = output.with_name(output.name + ".genq-checkpoint")

    def read_through() -> bool:
        if runner.poll() is not None:
            return True
        if not checkpoint.exists():
            return False
        return bool(json.loads(json.loads(checkpoint.read_text())["checkpoint"])["cursor"] == last)

    wait_for(read_through, timeout=60)


def test_a_dead_letter_replayed_while_its_batch_runs_loses_no_other_line(
    settings: GenqSettings, client: Client, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(name) for name in ("a", "b", "c")])
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    runner = start_batch(settings, source, output, errors)
    try:
        hand = HandWorker(client, redis_client, keys)
        messages = hand.take(3)
        batch_id = messages["a"].kwargs["batch_id"]
        hand.finish(messages["a"], JobState.FAILED)
        wait_for(lambda: len(read_jsonl(errors)) == 1, timeout=60)  # the runner wrote a's failure

        replayed = genq(settings, "dlq", "replay", messages["a"].message_id)
        assert replayed.returncode == 0, replayed.stderr
        hand.finish(messages["b"], JobState.SUCCEEDED)
        [rerun] = hand.take(1).values()
        hand.finish(rerun, JobState.SUCCEEDED)  # a finishes a second time: a second entry for one job
        wait_read_through(runner, redis_client, keys, batch_id, output)
        status = batch_status(settings, batch_id)
        assert (status["submitted"], status["in_flight"]) == (3, 1)  # c is still queued
        assert status["status"] == "in_progress"

        hand.finish(messages["c"], JobState.SUCCEEDED)
        _out, err = runner.communicate(timeout=120)
        assert runner.returncode == 0, err
    finally:
        stop(runner)

    assert Counter(line["custom_id"] for line in read_jsonl(output)) == Counter(["b", "c"])
    assert [line["custom_id"] for line in read_jsonl(errors)] == ["a"]  # written once, when it failed
    status = batch_status(settings, batch_id)
    assert status["status"] == "completed"
    assert (status["completed"], status["failed"], status["in_flight"]) == (2, 1, 0)


def test_a_batch_resumed_after_a_replay_writes_the_replayed_line_once_with_its_new_result(
    settings: GenqSettings, client: Client, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [batch_line(name) for name in ("a", "b", "c")])
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    first = start_batch(settings, source, output, errors)
    try:
        hand = HandWorker(client, redis_client, keys)
        messages = hand.take(3)
    finally:
        stop(first)  # the runner is gone before anything finished; a later run resumes
    batch_id = messages["a"].kwargs["batch_id"]
    hand.finish(messages["a"], JobState.FAILED)
    replayed = genq(settings, "dlq", "replay", messages["a"].message_id)
    assert replayed.returncode == 0, replayed.stderr
    hand.finish(messages["b"], JobState.SUCCEEDED)

    runner = start_batch(settings, source, output, errors)
    try:
        # It reads a's failure while a is queued again: no line yet (a's next finish brings one).
        wait_read_through(runner, redis_client, keys, batch_id, output)
        assert read_jsonl(errors) == []
        [rerun] = hand.take(1).values()
        hand.finish(rerun, JobState.SUCCEEDED)
        hand.finish(messages["c"], JobState.SUCCEEDED)
        _out, err = runner.communicate(timeout=120)
        assert runner.returncode == 0, err
    finally:
        stop(runner)

    written = {line["custom_id"]: line for line in read_jsonl(output)}
    assert sorted(written) == ["a", "b", "c"] and len(read_jsonl(output)) == 3
    assert written["a"]["response"]["body"]["choices"][0]["text"] == f"answer of {rerun.message_id}"
    assert read_jsonl(errors) == []
    status = batch_status(settings, batch_id)
    assert (status["status"], status["completed"], status["failed"], status["in_flight"]) == ("completed", 3, 0, 0)


def batch_id_of(stderr: str) -> str:
    """The id from the runner's own `batch ID: ...` line."""
    found = re.search(r"^batch ([\w.-]+): ", stderr, re.MULTILINE)
    assert found, stderr
    return found.group(1)
