"""After a failed attempt: retry on this pool, reroute to the next backend, or give up.

A pure function of the job's history, its route and what is left of its one deadline, so the
whole policy can be read, and tested, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobcontract.jobs import candidate_backends
from jobcontract.models import Attempt, AttemptOutcome, Backend
from jobcontract.routes import ModelRoute


@dataclass(frozen=True)
class RetryHere:
    delay_s: float
    solo: bool = False  # run it alone on its server: it was there when the server died


@dataclass(frozen=True)
class Reroute:
    backend: Backend


@dataclass(frozen=True)
class GiveUp:
    reason: str
    dead_letter: bool  # exhausted retryable failures are kept for replay; hopeless requests are not


Decision = RetryHere | Reroute | GiveUp

# Outcomes that use up a pool's attempts. A crash is handled apart (see decide).
CHARGED = frozenset(
    {AttemptOutcome.TIMEOUT, AttemptOutcome.CONNECTION_ERROR, AttemptOutcome.SERVER_ERROR, AttemptOutcome.UNAVAILABLE}
)
# Crashes one job may sit through before it is treated like any other failure.
MAX_CRASHES = 3


def decide(
    *,
    failed: Attempt,
    retryable: bool,
    history: Sequence[Attempt],
    route: ModelRoute,
    preferred: Backend | None,
    remaining_s: float,
    circuit_open: Callable[[Backend], bool],
    serving: Callable[[Backend], bool],
) -> Decision:
    """Retry here while this pool's attempts, its circuit and the deadline allow; then move to the next
    backend in the job's order that has live workers (preferring one whose circuit is closed); with
    none left, give up. A job is never sent to a pool nobody serves: it would only wait there.

    A server that died mid-answer is not charged to the jobs it was serving: each is retried alone,
    and one that kills the server while alone is poison and goes to dead letters."""
    if not retryable:
        return GiveUp(f"{failed.outcome.value}: {failed.error}", dead_letter=False)
    if remaining_s <= 0:
        return GiveUp(f"deadline passed after {len(history) + 1} attempt(s); last: {failed.error}", dead_letter=True)
    here = route.backend(failed.backend)
    if failed.outcome is AttemptOutcome.SERVER_CRASHED:
        if failed.solo:
            return GiveUp(
                f"the {failed.backend.value} server died while running this job alone: poison input?", dead_letter=True
            )
        crashes = 1 + sum(1 for a in history if a.outcome is AttemptOutcome.SERVER_CRASHED)
        if crashes > MAX_CRASHES:
            return GiveUp(f"the {failed.backend.value} server died {crashes} times under this job", dead_letter=True)
        return RetryHere(here.retry_backoff_s, solo=True)
    tried = {a.backend for a in history} | {failed.backend}
    live = [b for b in candidate_backends(route, preferred) if b not in tried and serving(b)]
    charged = [a for a in (*history, failed) if a.backend is failed.backend and a.outcome in CHARGED]
    tries_here = len(charged)
    # An open circuit sends jobs elsewhere; with nowhere else to go, this pool is still the best bet.
    if tries_here < here.max_attempts and (not circuit_open(failed.backend) or not live):
        delay = here.retry_backoff_s * 2 ** (tries_here - 1)
        if delay < remaining_s:
            return RetryHere(delay)
    if live:
        closed = [b for b in live if not circuit_open(b)]
        return Reroute((closed or live)[0])
    return GiveUp(
        f"no backend left to try (tried {', '.join(b.value for b in sorted(tried))}; the rest have no live "
        f"worker); last: {failed.error}",
        dead_letter=True,
    )
