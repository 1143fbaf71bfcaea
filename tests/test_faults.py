"""Faults injected for real into real workers, servers and Redis, each test reporting its figures.

One private redis-server with AOF on (this module restarts it) and one `genq worker` with two
processes serve most tests; a test that needs a second host or a worker to stop starts its own.
Liveness TTL is 3 s here so a frozen host is given up quickly. Every mlx_lm.server carries the
poison hook of tests/poison_site (inert unless a prompt holds the marker).
`--soak` repeats each fault many more times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import CONSUMER_GROUP, Keys
from jobcontract.models import GenerationRequest, JobState
from jobcontract.settings import GenqSettings
from producer.client import Client, GenqUnavailable
from tests.faults import (
    GENERATION_DIES_MARKER,
    POISON_MARKER,
    POISON_SITE,
    WorkerProcess,
    answers,
    collect,
    duplicated,
    freeze,
    pending_jobs,
    server_of,
    starts,
    thaw,
    wait_for,
    worker_processes,
)
from tests.harness import WorkerHandle, alive, start_worker, wait_until
from tests.reliability_figures import Figure, FigureBook

TTL_S = 3.0
WORKER_ENV = {
    "GENQ_LIVENESS_TTL_S": str(TTL_S),
    "PYTHONPATH": os.pathsep.join(p for p in (str(POISON_SITE), os.environ.get("PYTHONPATH", "")) if p),
}


def ask(n: int, max_tokens: int = 32, **extra: Any) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {"model": "tiny", "prompt": f"fault test {n}", "max_tokens": max_tokens, "temperature": 0.0, **extra}
    )


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_redis() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def fault_settings(fault_redis: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=fault_redis.url, namespace=f"f{uuid.uuid4().hex[:8]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def fault_keys(fault_settings: GenqSettings) -> Keys:
    return Keys(fault_settings.namespace)


@pytest.fixture(scope="module")
def shared_pool(fault_settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(
        fault_settings, tmp_path_factory.mktemp("fault-pool"), processes=2, concurrency=8, env=WORKER_ENV
    )
    yield handle
    handle.stop()


@pytest.fixture
def pool(shared_pool: WorkerHandle, fault_redis: LocalRedis) -> WorkerHandle:
    """The shared pool, whole again after whatever the previous test did to it."""
    if fault_redis.process is None:
        fault_redis.start()
    shared_pool.wait_ready(2, timeout=180)
    assert wait_until(lambda: len(worker_processes(shared_pool)) == 2, 60), shared_pool.log()
    return shared_pool


@pytest.fixture
def client(fault_settings: GenqSettings) -> Iterator[Client]:
    with Client(fault_settings) as c:
        yield c


@pytest.fixture
def raw(fault_redis: LocalRedis) -> Iterator[redis.Redis]:
    r = connect(fault_redis.url)
    yield r
    r.close()


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


def _running_elsewhere(raw: redis.Redis, keys: Keys, job_ids: list[str], victim: str) -> bool:
    """Every job is finished, or running on a worker other than the victim."""
    pipe = raw.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), "state", "worker")
    for state, worker in pipe.execute():
        state = (state or b"").decode()
        if state in ("succeeded", "failed", "cancelled"):
            continue
        if state != "running" or (worker or b"").decode() == victim:
            return False
    return True


def _where(raw: redis.Redis, keys: Keys, job_ids: list[str]) -> dict[str, Any]:
    """What Redis knows of jobs that went missing, for the failure message."""
    states: dict[str, int] = {}
    for job_id in job_ids:
        state = raw.hget(keys.job(job_id), "state")
        states[(state or b"no record").decode()] = states.get((state or b"no record").decode(), 0) + 1
    held = {k: len(v) for k, v in pending_jobs(raw, keys).items()}
    streams = {q.decode(): raw.xlen(keys.stream(q.decode())) for q in raw.smembers(keys.queues)}
    return {"states": states, "pending_by_consumer": held, "stream_lengths": streams, "first": job_ids[:2]}


def _busiest(pool: WorkerHandle, raw: redis.Redis, keys: Keys, at_least: int = 1) -> tuple[WorkerProcess, list[str]]:
    """The worker process holding the most jobs, once one holds at least `at_least`."""
    found: list[tuple[WorkerProcess, list[str]]] = []

    def look() -> bool:
        held = pending_jobs(raw, keys)
        candidates = [(w, held.get(w.consumer, [])) for w in worker_processes(pool)]
        candidates = [c for c in candidates if len(c[1]) >= at_least]
        if candidates:
            found.append(max(candidates, key=lambda c: len(c[1])))
        return bool(candidates)

    assert wait_for(look, 60, interval=0.01) is not None, "no worker ever held a job"
    return found[-1]


# -- worker processes killed mid-job ----------------------------------------------------------------------
def test_worker_processes_sigkilled_mid_job_lose_and_double_nothing(
    pool: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook, soak: bool
) -> None:
    kills = 30 if soak else 6
    per_round = 60
    job_ids: list[str] = []
    recoveries: list[float] = []
    replaced_in: list[float] = []
    handed_back: list[float] = []
    held_total = 0
    orphans = 0
    for round_ in range(kills):
        pool.wait_ready(2, timeout=180)
        assert wait_until(lambda: len(worker_processes(pool)) == 2, 60)
        job_ids += client.submit_many([ask(round_ * per_round + n) for n in range(per_round)])
        victim, held = _busiest(pool, raw, fault_keys)
        siblings = [w for w in worker_processes(pool) if w.pid != victim.pid]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        held_total += len(held)
        if wait_for(lambda v=victim: not alive(v.server_pid), 10) is None:
            orphans += 1
        handed = wait_for(lambda v=victim: v.consumer not in pending_jobs(raw, fault_keys), 30, interval=0.005)
        assert handed is not None, "the killed worker's jobs were never handed back"
        handed_back.append(handed)
        recovery = wait_for(lambda h=held, v=victim: _running_elsewhere(raw, fault_keys, h, v.consumer), 60)
        assert recovery is not None, f"jobs of the killed worker never ran again: {held}"
        recoveries.append(time.monotonic() - killed_at)
        assert all(alive(s.pid) for s in siblings), "a sibling worker process died with the killed one"
        pool.wait_ready(2, timeout=180)
        replaced_in.append(time.monotonic() - killed_at)
    results, _ = collect(client, job_ids, timeout=300)
    lost = len(job_ids) - len(results)
    dups = duplicated(raw, fault_keys, job_ids)
    failed = [r for r in results.values() if not r.ok]
    reran = sum(1 for j in job_ids if starts(raw, fault_keys, j) > 1)
    figures.record(
        Figure(
            test="test_worker_processes_sigkilled_mid_job_lose_and_double_nothing",
            fault="worker process SIGKILL mid-job",
            jobs=len(job_ids),
            faults_injected=kills,
            lost=lost,
            duplicated=dups,
            recovery_s=max(recoveries),
            extra={
                "jobs_held_by_killed": held_total,
                "jobs_run_twice": reran,
                "failed": len(failed),
                "orphan_servers": orphans,
                "handed_back_within_s": max(handed_back),
                "recovery_mean_s": sum(recoveries) / len(recoveries),
                "replaced_within_s": max(replaced_in),
            },
        )
    )
    assert lost == 0 and dups == 0
    assert not failed, [r.error for r in failed][:3]
    assert orphans == 0, "a killed worker's server outlived it"
    assert held_total > 0, "no kill hit a worker holding jobs"
    assert max(recoveries) < 15, recoveries


# -- a live worker keeps its long job --------------------------------------------------------------------
def test_a_long_generation_outliving_the_liveness_ttl_runs_once(
    pool: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook
) -> None:
    job_ids = client.submit_many([ask(9000 + n, max_tokens=3072) for n in range(2)])
    results, _ = collect(client, job_ids, timeout=300)
    assert len(results) == 2
    longest = max(r.timings.generation_s or 0 for r in results.values())
    reran = sum(1 for j in job_ids if starts(raw, fault_keys, j) != 1)
    figures.record(
        Figure(
            test="test_a_long_generation_outliving_the_liveness_ttl_runs_once",
            fault=f"generation longer than the liveness TTL ({TTL_S:.0f}s)",
            jobs=2,
            faults_injected=0,
            lost=0,
            duplicated=duplicated(raw, fault_keys, job_ids),
            extra={"longest_generation_s": longest, "redelivered": reran},
        )
    )
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert longest > TTL_S, "the generation was too short to outlive the TTL; the test proves nothing"
    assert reran == 0
    assert all(len(r.attempts) == 1 for r in results.values())


def test_a_frozen_worker_process_keeps_its_job_while_its_supervisor_vouches(
    pool: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook
) -> None:
    """A thread holding the GIL in native code stops every other thread of its process, heartbeats
    included; SIGSTOP of the worker process (not its supervisor) is that, for every thread at once."""
    job_id = client.submit(ask(9100, max_tokens=1024, stream=True))
    events = fault_keys.events(job_id)
    assert wait_until(lambda: raw.xlen(events) > 0, 60), "no token ever came"
    worker = raw.hget(fault_keys.job(job_id), "worker")
    assert worker is not None
    [frozen] = [w for w in worker_processes(pool) if w.consumer == worker.decode()]
    frozen_for = 2 * TTL_S + 1
    freeze(frozen.pid)
    try:
        deadline = time.monotonic() + frozen_for
        while time.monotonic() < deadline:
            assert pending_jobs(raw, fault_keys).get(frozen.consumer) == [job_id], "its job was handed away"
            assert starts(raw, fault_keys, job_id) == 1
            time.sleep(0.2)
    finally:
        thaw(frozen.pid)
    result = client.result(job_id, timeout=120)
    figures.record(
        Figure(
            test="test_a_frozen_worker_process_keeps_its_job_while_its_supervisor_vouches",
            fault=f"worker process SIGSTOPped {frozen_for:.0f}s mid-generation (TTL {TTL_S:.0f}s)",
            jobs=1,
            faults_injected=1,
            lost=0,
            duplicated=duplicated(raw, fault_keys, [job_id]),
            extra={"starts": starts(raw, fault_keys, job_id)},
        )
    )
    assert result.ok, result.error
    assert result.worker == frozen.consumer
    assert starts(raw, fault_keys, job_id) == 1
    assert len(result.attempts) == 1


def test_a_frozen_host_has_its_jobs_run_elsewhere_and_delivered_once(
    pool: WorkerHandle,
    client: Client,
    raw: redis.Redis,
    fault_keys: Keys,
    fault_settings: GenqSettings,
    tmp_path: Path,
    figures: FigureBook,
) -> None:
    """A host that stops answering (its supervisor, workers and servers all frozen) is given up when
    its liveness keys expire on Redis's clock; when it wakes, its late results are dropped."""
    other = start_worker(fault_settings, tmp_path, processes=1, concurrency=4, env=WORKER_ENV)
    try:
        [host_worker] = worker_processes(other)
        job_ids: list[str] = []
        held: list[str] = []

        def other_holds() -> bool:
            held[:] = pending_jobs(raw, fault_keys).get(host_worker.consumer, [])
            return bool(held)

        for attempt in range(10):
            job_ids += client.submit_many([ask(9200 + 10 * attempt + n, max_tokens=512) for n in range(10)])
            if wait_for(other_holds, 5, interval=0.01) is not None:
                break
        assert held, "the second host never took a job"
        frozen = [other.pid, host_worker.pid, host_worker.server_pid]
        freeze(*frozen)
        frozen_at = time.monotonic()
        try:
            recovery = wait_for(lambda: _running_elsewhere(raw, fault_keys, held, host_worker.consumer), 60)
        finally:
            thaw(*frozen)
        assert recovery is not None, "the frozen host's jobs never ran elsewhere"
        results, _ = collect(client, job_ids, timeout=240)
        dups = duplicated(raw, fault_keys, job_ids)
        figures.record(
            Figure(
                test="test_a_frozen_host_has_its_jobs_run_elsewhere_and_delivered_once",
                fault=f"whole host frozen (SIGSTOP supervisor+worker+server), TTL {TTL_S:.0f}s",
                jobs=len(job_ids),
                faults_injected=1,
                lost=len(job_ids) - len(results),
                duplicated=dups,
                recovery_s=time.monotonic() - frozen_at if recovery is None else recovery,
                extra={"jobs_held_by_frozen_host": len(held)},
            )
        )
        assert len(results) == len(job_ids)
        assert dups == 0
        assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok][:3]
        assert recovery < TTL_S + 10
    finally:
        other.stop()


# -- backend servers killed or frozen --------------------------------------------------------------------
def test_a_killed_or_frozen_server_is_back_fast_and_its_jobs_finish(
    pool: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook, soak: bool
) -> None:
    faults = ["kill", "freeze"] * (10 if soak else 2)
    job_ids: list[str] = []
    back_in: dict[str, list[float]] = {"kill": [], "freeze": []}
    retried = 0
    for n, fault in enumerate(faults):
        pool.wait_ready(2, timeout=180)
        batch = client.submit_many([ask(9300 + 10 * n + i, max_tokens=256) for i in range(6)])
        job_ids += batch

        def some_running(batch: list[str] = batch) -> bool:
            return any(raw.hget(fault_keys.job(j), "state") == b"running" for j in batch)

        assert wait_for(some_running, 60, interval=0.01) is not None
        worker = next(
            raw.hget(fault_keys.job(j), "worker") for j in batch if raw.hget(fault_keys.job(j), "state") == b"running"
        )
        [target] = [w for w in worker_processes(pool) if w.consumer == (worker or b"").decode()]
        os.kill(target.server_pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)

        def back(target: WorkerProcess = target) -> bool:
            server = server_of(target.pid)
            return server is not None and server[0] != target.server_pid and answers(server[1])

        took = wait_for(back, 60)
        assert took is not None, f"the server was not back after {fault}"
        back_in[fault].append(took)
        if fault == "freeze":
            assert wait_for(lambda t=target: not alive(t.server_pid), 10) is not None, "the frozen server was left"
        results, _ = collect(client, batch, timeout=120)
        retried += sum(1 for r in results.values() if len(r.attempts) > 1)
    results, _ = collect(client, job_ids, timeout=120)
    failed = [r for r in results.values() if not r.ok]
    everything = back_in["kill"] + back_in["freeze"]
    figures.record(
        Figure(
            test="test_a_killed_or_frozen_server_is_back_fast_and_its_jobs_finish",
            fault="backend server SIGKILL / SIGSTOP mid-job",
            jobs=len(job_ids),
            faults_injected=len(faults),
            lost=len(job_ids) - len(results),
            duplicated=duplicated(raw, fault_keys, job_ids),
            recovery_s=max(everything),
            extra={
                "back_after_kill_max_s": max(back_in["kill"]),
                "back_after_freeze_max_s": max(back_in["freeze"]),
                "jobs_retried_or_rerouted": retried,
                "failed": len(failed),
            },
        )
    )
    assert len(results) == len(job_ids)
    assert not failed, [r.error for r in failed][:3]
    assert retried > 0, "no fault hit a job mid-generation"


# -- Redis restarted, Redis unreachable ------------------------------------------------------------------
def test_redis_restarted_mid_batch_loses_nothing_and_nobody_hangs(
    pool: WorkerHandle,
    client: Client,
    fault_redis: LocalRedis,
    fault_keys: Keys,
    fault_settings: GenqSettings,
    figures: FigureBook,
    soak: bool,
) -> None:
    restarts = 12 if soak else 3
    job_ids = client.submit_many([ask(9500 + n, max_tokens=48) for n in range(60 * restarts)])
    longest_call = [0.0]
    caller_errors = [0]
    outcome: dict[str, Any] = {}

    def caller() -> None:
        """A caller blocked on results the whole time: every call must return, result or error."""
        with Client(fault_settings) as waiting:
            pending = list(job_ids)
            deadline = time.monotonic() + 240
            while pending and time.monotonic() < deadline:
                began = time.monotonic()
                try:
                    for result in waiting.results(pending[:20], timeout=5):
                        outcome[result.job_id] = result
                except TimeoutError:
                    for job_id in pending[:20]:
                        with contextlib.suppress(GenqUnavailable):
                            found = waiting.store.result(job_id)
                            if found is not None:
                                outcome[job_id] = found
                except GenqUnavailable:
                    caller_errors[0] += 1
                longest_call[0] = max(longest_call[0], time.monotonic() - began)
                pending = [j for j in pending if j not in outcome]

    thread = threading.Thread(target=caller)
    thread.start()
    back_in: list[float] = []
    for n in range(restarts):
        time.sleep(1.0)
        fault_redis.stop(kill=n % 2 == 1)  # SIGTERM, then SIGKILL: AOF with fsync always keeps both
        time.sleep(1.0)
        began = time.monotonic()
        fault_redis.start()
        back_in.append(time.monotonic() - began)
    thread.join(timeout=330)
    assert not thread.is_alive(), "a caller hung"
    raw = connect(fault_redis.url)
    try:
        dups = duplicated(raw, fault_keys, job_ids)
        failed = [r for r in outcome.values() if not r.ok]
        figures.record(
            Figure(
                test="test_redis_restarted_mid_batch_loses_nothing_and_nobody_hangs",
                fault="redis-server restarted mid-batch (AOF, 1 s down each)",
                jobs=len(job_ids),
                faults_injected=restarts,
                lost=len(job_ids) - len(outcome),
                duplicated=dups,
                recovery_s=max(back_in),
                extra={
                    "caller_retryable_errors": caller_errors[0],
                    "longest_caller_call_s": longest_call[0],
                    "failed": len(failed),
                    "jobs_run_twice": sum(1 for j in job_ids if starts(raw, fault_keys, j) > 1),
                },
            )
        )
        missing = [j for j in job_ids if j not in outcome]
        assert not missing, f"jobs lost across Redis restarts: {_where(raw, fault_keys, missing)}"
        assert dups == 0
        assert not failed, [r.error for r in failed][:3]
        assert longest_call[0] < 60
    finally:
        raw.close()


def test_submitting_while_redis_is_down_is_one_clear_error_and_queues_nothing(
    client: Client, fault_redis: LocalRedis, fault_keys: Keys, fault_settings: GenqSettings, figures: FigureBook
) -> None:
    raw = connect(fault_redis.url)
    before = sorted(raw.keys(f"{fault_keys.namespace}:*"))
    lengths = {k: raw.xlen(k) for k in before if raw.type(k) == b"stream"}
    fault_redis.stop()
    try:
        took: list[float] = []
        for n in range(5):
            began = time.monotonic()
            with pytest.raises(GenqUnavailable, match="cannot reach Redis"):
                client.submit_many([ask(9700 + 10 * n + i) for i in range(10)])
            took.append(time.monotonic() - began)
    finally:
        fault_redis.start()
    after = sorted(raw.keys(f"{fault_keys.namespace}:*"))
    grown = {k: raw.xlen(k) for k in lengths if raw.xlen(k) != lengths[k]}
    raw.close()
    figures.record(
        Figure(
            test="test_submitting_while_redis_is_down_is_one_clear_error_and_queues_nothing",
            fault="submit with redis-server down",
            jobs=50,
            faults_injected=5,
            lost=0,
            duplicated=0,
            extra={"error_after_max_s": max(took), "keys_created": len(set(after) - set(before))},
        )
    )
    assert set(after) - set(before) == set()
    assert grown == {}
    assert max(took) < 5


def test_submitting_to_a_frozen_redis_errors_in_bounded_time_and_is_not_doubled(
    fault_redis: LocalRedis, fault_keys: Keys, fault_settings: GenqSettings, figures: FigureBook
) -> None:
    """A frozen Redis accepts the bytes and answers nothing: the client times out, and the commands
    it sent (and re-sent) run when Redis wakes. The job must then exist once, never twice."""
    assert fault_redis.process is not None
    settings = fault_settings.model_copy(update={"namespace": f"frozen{uuid.uuid4().hex[:6]}"})
    keys = Keys(settings.namespace)
    with Client(settings) as frozen_client:
        frozen_client.redis.ping()
        freeze(fault_redis.process.pid)
        began = time.monotonic()
        try:
            with pytest.raises(GenqUnavailable):
                frozen_client.submit(ask(9800), job_id="frozen-job")
            took = time.monotonic() - began
        finally:
            thaw(fault_redis.process.pid)
    raw = connect(fault_redis.url)
    try:
        assert wait_until(lambda: raw.ping(), 10)
        time.sleep(0.5)
        copies = sum(raw.xlen(k) for k in raw.keys(f"{keys.namespace}:q:*"))
    finally:
        raw.close()
    figures.record(
        Figure(
            test="test_submitting_to_a_frozen_redis_errors_in_bounded_time_and_is_not_doubled",
            fault="submit to a frozen (SIGSTOPped) redis-server",
            jobs=1,
            faults_injected=1,
            lost=0,
            duplicated=max(0, copies - 1),
            extra={"error_after_s": took, "queued_copies_after_wake": copies},
        )
    )
    assert took < 60
    assert copies <= 1, f"one submit left {copies} copies of its job in the queue"


# -- poison input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("marker", "fault"),
    [
        (POISON_MARKER, "poison prompt that aborts mlx_lm.server every time"),
        # The process lives on, refusing service: its jobs must not be charged for it either.
        (GENERATION_DIES_MARKER, "poison prompt that kills mlx_lm.server's generation thread every time"),
    ],
    ids=["server-aborts", "generation-thread-dies"],
)
def test_a_poison_input_that_crashes_the_server_ends_in_dead_letters_and_the_pool_keeps_serving(
    pool: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook, marker: str, fault: str
) -> None:
    dead_before = raw.xlen(fault_keys.dead_letters)
    poison = client.submit(ask(9900, prompt=f"please {marker} now"))
    innocent = client.submit_many([ask(9901 + n, max_tokens=64) for n in range(16)])
    began = time.monotonic()
    result = client.result(poison, timeout=180)
    settled_in = time.monotonic() - began
    results, _ = collect(client, innocent, timeout=180)
    after = client.results(client.submit_many([ask(9950 + n) for n in range(8)]), timeout=120)
    dead = raw.xrange(fault_keys.dead_letters)[dead_before:]
    figures.record(
        Figure(
            test="test_a_poison_input_that_crashes_the_server_ends_in_dead_letters_and_the_pool_keeps_serving",
            fault=fault,
            jobs=1 + len(innocent) + len(after),
            faults_injected=len(result.attempts),
            lost=len(innocent) - len(results),
            duplicated=duplicated(raw, fault_keys, [poison, *innocent]),
            recovery_s=settled_in,
            extra={
                "poison_attempts": len(result.attempts),
                "innocent_failed": sum(1 for r in results.values() if not r.ok),
                "dead_letters": len(dead),
                "later_jobs_ok": f"{sum(r.ok for r in after)}/{len(after)}",
            },
        )
    )
    assert result.state is JobState.FAILED
    assert result.error is not None and result.error.retryable
    assert 1 <= len(result.attempts) <= 6
    [poison_letter] = [fields for _id, fields in dead if poison.encode() in fields[b"m"]]
    assert poison_letter[b"reason"], "dead-lettered without a reason"
    assert all(r.ok for r in after), [r.error for r in after if not r.ok][:2]
    # Jobs that shared the server with the poison lose their attempt when it crashes; they must be
    # retried (or rerouted), not failed with it.
    assert len(results) == len(innocent) and all(r.ok for r in results.values()), [
        r.error for r in results.values() if not r.ok
    ][:3]


# -- graceful shutdown -----------------------------------------------------------------------------------
def test_sigterm_finishes_or_hands_back_what_the_worker_holds_and_exits_cleanly(
    pool: WorkerHandle,
    client: Client,
    raw: redis.Redis,
    fault_keys: Keys,
    fault_settings: GenqSettings,
    tmp_path: Path,
    figures: FigureBook,
) -> None:
    grace_s = 4.0
    leaving = start_worker(
        fault_settings,
        tmp_path,
        processes=1,
        concurrency=4,
        env={**WORKER_ENV, "GENQ_SHUTDOWN_GRACE_S": str(grace_s)},
    )
    try:
        _leave_mid_batch(leaving, client, raw, fault_keys, figures, grace_s)
    finally:
        leaving.stop()


def _leave_mid_batch(
    leaving: WorkerHandle, client: Client, raw: redis.Redis, fault_keys: Keys, figures: FigureBook, grace_s: float
) -> None:
    [process] = worker_processes(leaving)
    held: list[str] = []

    def holding(*wanted: str) -> bool:
        held[:] = pending_jobs(raw, fault_keys).get(process.consumer, [])
        return all(j in held for j in wanted)

    # One job far longer than the grace, which it must hand back, taken by the leaving worker (a
    # job the pool took instead is cancelled and another tried) ...
    long_job = ""
    for attempt in range(30):
        long_job = client.submit(ask(10_000 + attempt, max_tokens=4000, lane="batch"))
        if wait_for(lambda j=long_job: holding(j), 2, interval=0.01) is not None:
            break
        client.cancel(long_job)
    assert long_job in held, "the leaving worker never took the long job"
    # ... and short ones it can finish within the grace.
    job_ids = [long_job]
    for attempt in range(20):
        job_ids += client.submit_many([ask(10_100 + 20 * attempt + n, max_tokens=96) for n in range(20)])
        if wait_for(lambda j=long_job: holding(j) and len(held) > 2, 5, interval=0.01) is not None:
            break
    assert long_job in held and len(held) > 2, "the leaving worker never held short jobs too"
    running = [j for j in held if raw.hget(fault_keys.job(j), "state") == b"running" and j != long_job]
    sigterm_at = time.monotonic()
    code = leaving.stop(timeout=120)
    exited_in = time.monotonic() - sigterm_at
    results, _ = collect(client, job_ids, timeout=300)
    by_leaver = [j for j in running if j in results and results[j].worker == process.consumer]
    dups = duplicated(raw, fault_keys, job_ids)
    figures.record(
        Figure(
            test="test_sigterm_finishes_or_hands_back_what_the_worker_holds_and_exits_cleanly",
            fault=f"SIGTERM mid-batch (grace {grace_s:.0f}s)",
            jobs=len(job_ids),
            faults_injected=1,
            lost=len(job_ids) - len(results),
            duplicated=dups,
            recovery_s=exited_in,
            extra={
                "held_at_sigterm": len(held),
                "running_finished_by_leaver": f"{len(by_leaver)}/{len(running)}",
                "long_job_starts": starts(raw, fault_keys, long_job),
                "exit_code": code,
            },
        )
    )
    assert code == 0
    assert not alive(process.pid) and not alive(process.server_pid)
    assert len(results) == len(job_ids) and dups == 0
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok][:3]
    assert set(by_leaver) == set(running), "an in-flight short job was not finished by its worker"
    assert results[long_job].worker != process.consumer, "the long job was not handed back"
    # Nothing it held is left pending on its name.
    assert process.consumer not in pending_jobs(raw, fault_keys)
    assert all(
        c["name"] != process.consumer.encode()
        for q in raw.smembers(fault_keys.queues)
        for c in raw.xinfo_consumers(fault_keys.stream(q.decode()), CONSUMER_GROUP)
        if c["pending"]
    )
