"""What a batch run reports as it goes: counts, throughput and an ETA, computed from two snapshots
of the counts (at the run's start and now), so a resumed run's rates count only its own work."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from producer.batch.book import BatchStatus
from producer.batch.sinks import Counts


@dataclass(frozen=True)
class Progress:
    batch_id: str
    status: BatchStatus
    total: int
    submitted: int
    counts: Counts
    elapsed_s: float
    tokens_per_s: float
    eta_s: float | None

    @property
    def in_flight(self) -> int:
        return max(0, self.submitted - self.counts.written)


ProgressCallback = Callable[[Progress], None]


def measure(
    batch_id: str, status: BatchStatus, total: int, submitted: int, counts: Counts, start: Counts, started: float
) -> Progress:
    """The progress of a run that started at monotonic `started` with `start` counts."""
    elapsed = time.monotonic() - started
    done_now = counts.written - start.written
    rate = done_now / elapsed if elapsed > 0 else 0.0
    return Progress(
        batch_id=batch_id,
        status=status,
        total=total,
        submitted=submitted,
        counts=counts,
        elapsed_s=elapsed,
        tokens_per_s=(counts.tokens - start.tokens) / elapsed if elapsed > 0 else 0.0,
        eta_s=(total - counts.written) / rate if rate > 0 else None,
    )
