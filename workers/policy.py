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
# Crashes one job may sit through on one backend before that backend gives up on it.
MAX_CRASHES = 3
# Deaths of a server running this job alone before the job is held to be poison for that backend.
# One is no proof: an operator, the OOM killer or a deploy can kill a server under an innocent job.
POISON_SOLO_CRASHES = 2


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

    A server that died mid-answer is not charged to the jobs it was serving: each is retried alone.
    A job under which the server died alone twice is poison for that backend: it moves to another
    live backend if its route has one, and only then goes to dead letters."""
    if not retryable:
        return GiveUp(f"{failed.outcome.value}: {failed.error}", dead_letter=False)
    if remaining_s <= 0:
        return GiveUp(f"deadline passed after {len(history) + 1} attempt(s); last: {failed.error}", dead_letter=True)
    here = route.backend(failed.backend)
    tried = {a.backend for a in history} | {failed.backend}
    if failed.outcome is AttemptOutcome.SERVER_CRASHED:
        crashes = [a for a in (*history, failed) if a.backend is failed.backend and a.outcome is failed.outcome]
        alone = sum(1 for a in crashes if a.solo)
        if alone < POISON_SOLO_CRASHES and len(crashes) <= MAX_CRASHES:
            return RetryHere(here.retry_backoff_s, solo=True)
        elsewhere = _live_untried(route, preferred, tried, serving)
        if elsewhere:
            return Reroute(_closed_first(elsewhere, circuit_open))
        if alone >= POISON_SOLO_CRASHES:
            reason = f"the {failed.backend.value} server died {alone} times while running this job alone: poison input?"
        else:
            reason = f"the {failed.backend.value} server died {len(crashes)} times under this job"
        return GiveUp(f"{reason} (no other backend with a live worker)", dead_letter=True)
    live = _live_untried(route, preferred, tried, serving)
    charged = [a for a in (*history, failed) if a.backend is failed.backend and a.outcome in CHARGED]
    tries_here = len(charged)
    # An open circuit sends jobs elsewhere; with nowhere else to go, this pool is still the best bet.
    if tries_here < here.max_attempts and (not circuit_open(failed.backend) or not live):
        delay = here.retry_backoff_s * 2 ** (tries_here - 1)
        if delay < remaining_s:
            return RetryHere(delay)
    if live:
        return Reroute(_closed_first(live, circuit_open))
    return GiveUp(
        f"no backend left to try (tried {', '.join(b.value for b in sorted(tried))}; the rest have no live "
        f"worker); last: {failed.error}",
        dead_letter=True,
    )


def _live_untried(
    route: ModelRoute, preferred: Backend | None, tried: set[Backend], serving: Callable[[Backend], bool]
) -> list[Backend]:
    """Backends of the job's route, in its order, not tried yet and with a live worker."""
    return [b for b in candidate_backends(route, preferred) if b not in tried and serving(b)]


def _closed_first(live: list[Backend], circuit_open: Callable[[Backend], bool]) -> Backend:
    closed = [b for b in live if not circuit_open(b)]
    return (closed or live)[0]
