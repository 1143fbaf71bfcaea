"""The body of the generate actor: one attempt of one job on this worker's server.

A failed attempt raises AttemptFailed carrying what happened; what to do next (retry here,
reroute to the next backend, give up) is the rerouting middleware's decision, not this code's.

Two kinds of job (docs/metrics-and-ops.md): a job someone streams gets a streamed completion, its
tokens published as they come (grouped within 5 ms: workers.token_batch), first token and gaps
timed. A job nobody streams gets one plain completion (a third of the worker CPU), bounded by
first-token timeout + token timeout x max_tokens capped by the deadline, watched through the
server's probe (silent longer than the larger timeout fails the attempt), cancelled by closing the
request; it has no first token time (none is faked) and feeds no first-token or inter-token metric.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx

from jobcontract import results
from jobcontract.jobs import JobStore, StartTicket
from jobcontract.models import (
    Attempt,
    AttemptOutcome,
    Backend,
    GenerationRequest,
    JobState,
    Timings,
    utc_from_micros,
)
from jobcontract.routes import BackendRoute
from workers.attempts import AttemptFailed as AttemptFailed  # where the middleware looks
from workers.attempts import cancelled_result
from workers.backend_client import BackendError, Cancelled, Timeouts, complete
from workers.cancellation import CancelWatch
from workers.metrics import WorkerMetrics, tenant_label
from workers.servers.supervisor import JobServer
from workers.solo import POLL_S, GateClosed, SoloGate
from workers.token_batch import TokenBatch

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        *,
        store: JobStore,
        server: JobServer,
        route: BackendRoute,
        worker_name: str,
        queue_for_lane: dict[str, str],
        http: httpx.Client,
        cancels: CancelWatch,
        metrics: WorkerMetrics,
    ) -> None:
        self.store = store
        self.server = server
        self.route = route
        self.backend: Backend = route.backend
        self.worker_name = worker_name
        self.queue_for_lane = queue_for_lane
        self.http = http
        self.cancels = cancels
        self.metrics = metrics
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.gate = SoloGate()

    def run(
        self,
        job_id: str,
        request: dict[str, Any],
        attempts: list[dict[str, Any]],
        batch_id: str | None = None,
        solo: bool = False,
        tenant: str | None = None,
        **_later: Any,
    ) -> None:
        """One delivery of a job. `tenant` (set at admission by the gateway) labels its metrics; kwargs
        this worker does not know yet are ignored, so a newer gateway's message still runs here."""
        parsed = GenerationRequest.model_validate(request)
        tenant = tenant_label(tenant)
        queue = self.queue_for_lane[parsed.lane.value]
        # Listen before the job is marked running: a cancel sent once it runs is then never missed (one
        # sent before is seen by the start script), and it holds from the start, not from the request.
        with self.cancels.watch(job_id) as cancelled:
            ticket = self.store.start(job_id, self.worker_name, self.backend, queue)
            started_mono = time.monotonic()
            if not isinstance(ticket, StartTicket):
                if ticket is JobState.CANCELLED:
                    self._finish_cancelled(job_id, parsed, attempts, batch_id, tenant, started=None)
                log.info("job %s not run: %s", job_id, "record expired" if ticket is None else ticket.value)
                return
            with self._count_lock:
                self.in_flight += 1
                self.metrics.in_flight.set(self.in_flight)
            try:
                self._attempt(job_id, parsed, attempts, batch_id, tenant, ticket, solo, started_mono, cancelled)
            finally:
                with self._count_lock:
                    self.in_flight -= 1
                    self.metrics.in_flight.set(self.in_flight)

    def _attempt(
        self,
        job_id: str,
        request: GenerationRequest,
        history: list[dict[str, Any]],
        batch_id: str | None,
        tenant: str,
        ticket: StartTicket,
        solo: bool,
        started_mono: float,
        cancelled: threading.Event,
    ) -> None:
        """One attempt, timed from its real start: waiting at the solo gate and for a restarting server
        is part of it, is taken from its deadline, and ends when the job is cancelled."""
        started_at = utc_from_micros(ticket.started_us)
        enqueued_at = utc_from_micros(ticket.enqueued_us)
        deadline = started_mono + ticket.remaining_s
        self.metrics.queue_wait.labels(**self._labels(request, tenant)).observe(
            max(0.0, (ticket.started_us - ticket.enqueued_us) / 1e6)
        )

        def fail(outcome: AttemptOutcome, message: str, retryable: bool) -> AttemptFailed:
            attempt = Attempt(
                backend=self.backend,
                worker=self.worker_name,
                outcome=outcome,
                started_at=started_at,
                duration_s=time.monotonic() - started_mono,
                error=message,
                solo=solo,
            )
            return AttemptFailed(
                attempt, retryable=retryable, deadline_us=ticket.deadline_us, enqueued_us=ticket.enqueued_us
            )

        def finish_cancelled() -> None:
            self._finish_cancelled(
                job_id,
                request,
                history,
                batch_id,
                tenant,
                started=started_at,
                enqueued_at=enqueued_at,
                duration=time.monotonic() - started_mono,
            )

        if ticket.remaining_s <= 0:
            raise fail(AttemptOutcome.TIMEOUT, "deadline passed before the job started", False)
        try:
            with self.server.using(), self.gate.enter(solo=solo, deadline=deadline, cancelled=cancelled):
                waited = self._await_server(deadline, cancelled)
                if waited == "cancelled":
                    finish_cancelled()
                    return
                if waited == "deadline":
                    raise fail(AttemptOutcome.TIMEOUT, f"deadline passed waiting for {self.server.spec.name}", False)
                if waited == "not ready":
                    raise fail(AttemptOutcome.UNAVAILABLE, f"{self.server.spec.name} is not ready", True)
                self._generate(
                    job_id, request, history, batch_id, tenant, ticket, started_mono, deadline, cancelled, fail
                )
        except GateClosed as closed:
            if closed.cancelled:
                finish_cancelled()
                return
            raise fail(
                AttemptOutcome.TIMEOUT, "deadline passed waiting for jobs running alone on the server", False
            ) from closed
        except Cancelled:
            finish_cancelled()

    def _await_server(self, deadline: float, cancelled: threading.Event) -> str:
        """Wait for the server (restarting after a crash, or a model loading on demand) as long as a first
        token, or a load, may take: 'ready', 'not ready', or 'deadline' / 'cancelled' when those come first."""
        patience = max(self.route.first_token_timeout_s, self.server.load_wait_s)
        ready_by = min(deadline, time.monotonic() + patience)
        while not self.server.wait_ready(min(POLL_S, ready_by - time.monotonic())):
            if cancelled.is_set():
                return "cancelled"
            if time.monotonic() >= ready_by:
                return "deadline" if time.monotonic() >= deadline else "not ready"
        return "cancelled" if cancelled.is_set() else "ready"

    def _generate(
        self,
        job_id: str,
        request: GenerationRequest,
        history: list[dict[str, Any]],
        batch_id: str | None,
        tenant: str,
        ticket: StartTicket,
        started_mono: float,
        deadline: float,
        cancelled: threading.Event,
        fail: Callable[[AttemptOutcome, str, bool], AttemptFailed],
    ) -> None:
        started_at, server_before = utc_from_micros(ticket.started_us), self.server.pid
        route = self.route
        timeouts = Timeouts(route.first_token_timeout_s, between_tokens_s=route.token_timeout_s, deadline=deadline)
        tokens = TokenBatch(lambda i, texts: self.store.publish_tokens(job_id, i, texts)) if request.stream else None
        try:
            with tokens or contextlib.nullcontext():
                completion = complete(
                    self.http,
                    self.server.base_url,
                    request,
                    self.server.spec,
                    timeouts,
                    on_text=tokens.add if tokens else None,
                    cancelled=cancelled,
                    plain=not request.stream,
                    stalled=lambda: self.server.silent_s() > max(timeouts.first_token_s, timeouts.between_tokens_s),
                )
        except BackendError as error:
            outcome = error.outcome
            # Cut off (the process died) or refused (mlx_lm.server answers "generation thread died"
            # once that thread is gone): the server's failure, not the job's.
            broke = outcome in (AttemptOutcome.CONNECTION_ERROR, AttemptOutcome.SERVER_ERROR)
            if broke and self.server.died_since(server_before):
                outcome = AttemptOutcome.SERVER_CRASHED
            raise fail(outcome, str(error), error.retryable) from error

        def at(mono: float) -> datetime:
            return started_at + timedelta(seconds=mono - started_mono)

        attempt = Attempt(
            backend=self.backend,
            worker=self.worker_name,
            outcome=AttemptOutcome.SUCCEEDED,
            started_at=started_at,
            duration_s=completion.finished_at - started_mono,
        )
        result = results.succeeded(
            job_id,
            request.model,
            text=completion.text,
            finish_reason="stop" if completion.finish_reason == "stop" else "length",
            usage=completion.usage(),
            backend=self.backend,
            worker=self.worker_name,
            attempts=[*(Attempt.model_validate(a) for a in history), attempt],
            timings=Timings(
                enqueued_at=utc_from_micros(ticket.enqueued_us),
                started_at=started_at,
                first_token_at=None if completion.first_token_at is None else at(completion.first_token_at),
                finished_at=at(completion.finished_at),
            ),
            metadata=request.metadata,
        )
        if self.store.finish(result, batch_id):
            self.metrics.observe_success(request, result, completion.token_gaps, tenant)
        else:
            log.info("job %s had already finished elsewhere; this run's result is dropped", job_id)

    def _finish_cancelled(
        self,
        job_id: str,
        request: GenerationRequest,
        history: list[dict[str, Any]],
        batch_id: str | None,
        tenant: str,
        *,
        started: datetime | None,
        enqueued_at: datetime | None = None,
        duration: float = 0.0,
    ) -> None:
        attempt = None
        if started is not None:
            attempt = Attempt(
                backend=self.backend,
                worker=self.worker_name,
                outcome=AttemptOutcome.CANCELLED,
                started_at=started,
                duration_s=duration,
            )
        result = cancelled_result(
            self.store,
            job_id,
            request,
            history,
            attempt,
            backend=self.backend,
            worker=self.worker_name,
            enqueued_at=enqueued_at,
        )
        if self.store.finish(result, batch_id):
            self.metrics.jobs.labels(**self._labels(request, tenant), outcome="cancelled").inc()

    def _labels(self, request: GenerationRequest, tenant: str) -> dict[str, str]:
        return {"model": request.model, "backend": self.backend.value, "tenant": tenant}
