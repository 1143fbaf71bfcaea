"""After a failed attempt: retry on this pool, reroute to the next backend, or give up.

A pure function of the job's history, its route and what is left of its one deadline, so the
whole policy can be read, and tested, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobcontract.jobs import candidate_backends
from jobcontract.models import Attempt, Backend
from jobcontract.routes import ModelRoute


@dataclass(frozen=True)
class RetryHere:
    delay_s: float


@dataclass(frozen=True)
class Reroute:
    backend: Backend


@dataclass(frozen=True)
class GiveUp:
    reason: str
    dead_letter: bool  # exhausted retryable failures are kept for replay; hopeless requests are not


Decision = RetryHere | Reroute | GiveUp


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
    none left, give up. A job is never sent to a pool nobody serves: it would only wait there."""
    if not retryable:
        return GiveUp(f"{failed.outcome.value}: {failed.error}", dead_letter=False)
    if remaining_s <= 0:
        return GiveUp(f"deadline passed after {len(history) + 1} attempt(s); last: {failed.error}", dead_letter=True)
    here = route.backend(failed.backend)
    tries_here = 1 + sum(1 for a in history if a.backend is failed.backend)
    if tries_here < here.max_attempts and not circuit_open(failed.backend):
        delay = here.retry_backoff_s * 2 ** (tries_here - 1)
        if delay < remaining_s:
            return RetryHere(delay)
    tried = {a.backend for a in history} | {failed.backend}
    live = [b for b in candidate_backends(route, preferred) if b not in tried and serving(b)]
    if live:
        closed = [b for b in live if not circuit_open(b)]
        return Reroute((closed or live)[0])
    return GiveUp(
        f"no backend left to try (tried {', '.join(b.value for b in sorted(tried))}; the rest have no live "
        f"worker); last: {failed.error}",
        dead_letter=True,
    )
