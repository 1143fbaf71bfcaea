"""The failure policy as a pure function: every branch, no servers needed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from jobcontract.models import Attempt, AttemptOutcome, Backend
from jobcontract.routes import BackendRoute, ModelRoute
from workers.policy import GiveUp, Reroute, RetryHere, decide
from workers.solo import GateClosed, SoloGate

ROUTE = ModelRoute(
    name="m",
    backends=[BackendRoute(path="mlx-folder", max_attempts=2), BackendRoute(path="m.gguf", max_attempts=1)],
)
MLX, LLAMA = Backend.MLX, Backend.LLAMACPP


def attempt(backend: Backend, outcome: AttemptOutcome, *, solo: bool = False) -> Attempt:
    return Attempt(
        backend=backend, worker="w", outcome=outcome, started_at=datetime.now(UTC), duration_s=0.1, solo=solo
    )


def choose(
    failed: Attempt,
    history: Sequence[Attempt] = (),
    *,
    retryable: bool = True,
    remaining_s: float = 60,
    open_circuits: frozenset[Backend] = frozenset(),
    serving: frozenset[Backend] = frozenset({MLX, LLAMA}),
) -> object:
    return decide(
        failed=failed,
        retryable=retryable,
        history=history,
        route=ROUTE,
        preferred=None,
        remaining_s=remaining_s,
        circuit_open=lambda b: b in open_circuits,
        serving=lambda b: b in serving,
    )


def test_a_timeout_is_retried_here_then_rerouted_then_given_up() -> None:
    first = attempt(MLX, AttemptOutcome.TIMEOUT)
    assert isinstance(choose(first), RetryHere)
    assert choose(first, [attempt(MLX, AttemptOutcome.TIMEOUT)]) == Reroute(LLAMA)
    last = choose(attempt(LLAMA, AttemptOutcome.TIMEOUT), [first, first])
    assert isinstance(last, GiveUp) and last.dead_letter


def test_a_refused_request_fails_at_once_without_dead_letter() -> None:
    decision = choose(attempt(MLX, AttemptOutcome.INVALID), retryable=False)
    assert isinstance(decision, GiveUp) and not decision.dead_letter


def test_no_time_left_gives_up() -> None:
    assert isinstance(choose(attempt(MLX, AttemptOutcome.TIMEOUT), remaining_s=0), GiveUp)


def test_an_open_circuit_reroutes_at_once_but_not_when_nothing_else_serves() -> None:
    failed = attempt(MLX, AttemptOutcome.TIMEOUT)
    assert choose(failed, open_circuits=frozenset({MLX})) == Reroute(LLAMA)
    assert isinstance(choose(failed, open_circuits=frozenset({MLX}), serving=frozenset({MLX})), RetryHere)


def test_a_job_is_never_rerouted_to_a_pool_nobody_serves() -> None:
    decision = choose(
        attempt(MLX, AttemptOutcome.TIMEOUT), [attempt(MLX, AttemptOutcome.TIMEOUT)], serving=frozenset({MLX})
    )
    assert isinstance(decision, GiveUp)


def test_a_crash_is_not_charged_and_the_suspect_runs_alone() -> None:
    crashed = attempt(MLX, AttemptOutcome.SERVER_CRASHED)
    assert choose(crashed, [attempt(MLX, AttemptOutcome.TIMEOUT)]) == RetryHere(
        ROUTE.backends[0].retry_backoff_s, solo=True
    )


def test_one_death_of_the_server_under_a_job_alone_is_no_proof_of_poison() -> None:
    """An operator, the OOM killer or a deploy can kill a server under an innocent job running alone."""
    crashed = attempt(MLX, AttemptOutcome.SERVER_CRASHED)
    alone = attempt(MLX, AttemptOutcome.SERVER_CRASHED, solo=True)
    for serving in (frozenset({MLX}), frozenset({MLX, LLAMA})):
        assert choose(alone, [crashed], serving=serving) == RetryHere(ROUTE.backends[0].retry_backoff_s, solo=True)


def test_a_job_the_server_died_under_alone_twice_moves_to_another_live_backend_first() -> None:
    crashed = attempt(MLX, AttemptOutcome.SERVER_CRASHED)
    alone = attempt(MLX, AttemptOutcome.SERVER_CRASHED, solo=True)
    assert choose(alone, [crashed, alone]) == Reroute(LLAMA)
    assert choose(alone, [alone], open_circuits=frozenset({LLAMA})) == Reroute(LLAMA)  # still better than nothing


def test_a_job_the_server_died_under_alone_twice_with_nowhere_else_to_go_is_poison() -> None:
    crashed = attempt(MLX, AttemptOutcome.SERVER_CRASHED)
    alone = attempt(MLX, AttemptOutcome.SERVER_CRASHED, solo=True)
    guilty = choose(alone, [crashed, alone], serving=frozenset({MLX}))
    assert isinstance(guilty, GiveUp) and guilty.dead_letter and "2 times while running this job alone" in guilty.reason
    # A backend already tried is not somewhere else.
    tried = choose(alone, [attempt(LLAMA, AttemptOutcome.TIMEOUT), crashed, alone])
    assert isinstance(tried, GiveUp) and tried.dead_letter


def test_crashes_are_counted_per_backend() -> None:
    """Crashes on mlx do not use up the job's crash allowance on llama.cpp, where it may run fine."""
    mlx_crashes = [attempt(MLX, AttemptOutcome.SERVER_CRASHED)] * 2 + [
        attempt(MLX, AttemptOutcome.SERVER_CRASHED, solo=True)
    ] * 2
    crashed_on_llama = attempt(LLAMA, AttemptOutcome.SERVER_CRASHED)
    assert choose(crashed_on_llama, mlx_crashes) == RetryHere(ROUTE.backends[1].retry_backoff_s, solo=True)


def test_many_crashes_while_shared_move_the_job_elsewhere_before_giving_up() -> None:
    crashed = attempt(MLX, AttemptOutcome.SERVER_CRASHED)
    assert choose(crashed, [crashed] * 3) == Reroute(LLAMA)
    given_up = choose(crashed, [crashed] * 3, serving=frozenset({MLX}))
    assert isinstance(given_up, GiveUp) and given_up.dead_letter and "4 times" in given_up.reason


def test_the_solo_gate_runs_a_suspect_with_nothing_else_on_the_server() -> None:
    gate, inside, overlaps = SoloGate(), [0], []

    def job(solo: bool) -> None:
        with gate.enter(solo=solo):
            inside[0] += 1
            overlaps.append((solo, inside[0]))
            time.sleep(0.02)
            inside[0] -= 1

    threads = [threading.Thread(target=job, args=(n == 3,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [count for solo, count in overlaps if solo] == [1]
    assert max(count for _solo, count in overlaps) > 1  # the others did share the server


def test_a_job_waiting_at_the_solo_gate_stops_waiting_at_its_deadline_or_on_cancel() -> None:
    gate, release = SoloGate(), threading.Event()

    def suspect() -> None:
        with gate.enter(solo=True):
            release.wait(10)

    holder = threading.Thread(target=suspect)
    holder.start()
    try:
        while not gate._solo:
            time.sleep(0.001)
        with pytest.raises(GateClosed) as late, gate.enter(solo=False, deadline=time.monotonic() + 0.05):
            pass
        assert not late.value.cancelled
        cancelled = threading.Event()
        threading.Timer(0.05, cancelled.set).start()
        with pytest.raises(GateClosed) as stopped, gate.enter(solo=True, cancelled=cancelled):
            pass
        assert stopped.value.cancelled
    finally:
        release.set()
        holder.join()
    with gate.enter(solo=False, deadline=time.monotonic() + 1):  # nothing left behind by the two who gave up
        pass
