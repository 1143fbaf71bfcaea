"""The dramatiq middleware that acts on the policy after every failed attempt.

It replaces dramatiq's Retries middleware, which retries every exception on the same queue with
a 15 s backoff and knows nothing of deadlines or other backends.

Every Redis step of a decision waits out an outage like the worker's other calls. A decision that
still cannot be made is not a reason to drop the job: dramatiq would log the error and ack the
message, leaving the job `running` with no result, retry or dead letter. Instead the message is
marked `Undecided`, and the consumer leaves its entry pending in Redis to be delivered again.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.errors import BrokerConnectionError

from jobcontract import results
from jobcontract.broker import LeavePending
from jobcontract.jobs import JobStore
from jobcontract.keys import queue_name
from jobcontract.models import (
    Attempt,
    AttemptOutcome,
    Backend,
    GenerationRequest,
    utc_from_micros,
)
from jobcontract.outage import OUTAGE_ERRORS, ride_out
from jobcontract.protocol.liveness import LiveWorkers
from jobcontract.protocol.operation import run
from jobcontract.routes import ModelRoute
from workers.circuit import CircuitBreaker
from workers.metrics import WorkerMetrics, tenant_label
from workers.policy import GiveUp, Reroute, RetryHere, decide
from workers.runner import AttemptFailed

log = logging.getLogger(__name__)


class Undecided(LeavePending):
    """What to do after a failed attempt could not be decided (Redis away too long): the consumer
    must leave the message's entry pending, never ack it, so the job runs again."""


class Rerouting(dramatiq.Middleware):
    def __init__(
        self,
        *,
        store: JobStore,
        route: ModelRoute,
        backend: Backend,
        circuit: CircuitBreaker,
        metrics: WorkerMetrics,
        worker_name: str,
    ) -> None:
        self.store = store
        self.backend = backend
        self.route = route
        self.circuit = circuit
        self.metrics = metrics
        self.worker_name = worker_name

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            self.circuit.record_success(self.backend)  # "in a row": a success ends a failure streak
            return
        try:
            self._after_failure(broker, message, exception)
        except (*OUTAGE_ERRORS, BrokerConnectionError) as error:
            log.error(
                "job %s: could not decide what follows its failed attempt (%r); it will be delivered again",
                message.message_id,
                error,
            )
            message.stuff_exception(Undecided(repr(error)))
        except Exception as error:
            # A bug, not an outage: delivering it again would fail the same way, every second, forever.
            log.exception("job %s: deciding what follows its failed attempt raised; dead-lettered", message.message_id)
            self._dead_letter_on_bug(message, error)

    def _dead_letter_on_bug(self, message: dramatiq.MessageProxy, error: Exception) -> None:
        """File the job under dead letters (replayable) with a failed result, so nobody waits on it; if
        even that cannot be written, leave the entry pending rather than lose the job."""
        try:
            request = GenerationRequest.model_validate(message.kwargs["request"])
            reason = GiveUp(f"worker error while deciding: {error!r}", dead_letter=True)
            self._give_up(message, request, [], reason, None)
        except Exception as second:
            log.error("job %s: could not dead-letter it either (%r); delivered again", message.message_id, second)
            message.stuff_exception(Undecided(repr(second)))

    def _after_failure(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy, exception: BaseException) -> None:
        request = GenerationRequest.model_validate(message.kwargs["request"])
        if not isinstance(exception, AttemptFailed):
            log.exception("job %s failed on an unexpected error", message.message_id, exc_info=exception)
            self._give_up(message, request, [], GiveUp(f"worker error: {exception!r}", dead_letter=True), None)
            return
        failed = exception.attempt
        history = [Attempt.model_validate(a) for a in message.kwargs.get("attempts", [])]
        labels = {"model": request.model, "backend": failed.backend.value}
        self.metrics.attempts.labels(**labels, outcome=failed.outcome.value).inc()
        if exception.retryable and failed.outcome is not AttemptOutcome.SERVER_CRASHED:
            self.circuit.record_failure(failed.backend)  # a crash is the supervisor's to mend
        remaining = (exception.deadline_us - exception.enqueued_us) / 1e6 - _elapsed_s(exception, failed)
        decision = decide(
            failed=failed,
            retryable=exception.retryable,
            history=history,
            route=self.route,
            preferred=request.backend,
            remaining_s=remaining,
            circuit_open=self.circuit.is_open,
            serving=self._serving,
        )
        attempts = [*message.kwargs.get("attempts", []), failed.model_dump(mode="json")]
        kwargs = {**message.kwargs, "attempts": attempts, "solo": False}
        if isinstance(decision, RetryHere):
            self.metrics.retries.labels(**labels, reason=failed.outcome.value).inc()
            delay_ms = int(decision.delay_s * 1000)
            retry = message._message.copy(kwargs={**kwargs, "solo": decision.solo})
            broker.enqueue(retry, delay=delay_ms if delay_ms > 0 else None)
        elif isinstance(decision, Reroute):
            tenant = tenant_label(message.kwargs.get("tenant"))
            self.metrics.observe_reroute(request.model, failed.backend.value, decision.backend.value, tenant)
            target = queue_name(request.model, decision.backend, request.lane)
            broker.enqueue(message._message.copy(queue_name=target, kwargs=kwargs))
            log.info(
                "job %s (tenant %s) rerouted %s -> %s after %s",
                message.message_id,
                tenant,
                failed.backend.value,
                decision.backend.value,
                failed.outcome.value,
            )
        else:
            self._give_up(message, request, [*history, failed], decision, exception)

    def _serving(self, backend: Backend) -> bool:
        """A pool serves while some worker's vouched-until instant (Redis clock) is still ahead."""
        live = LiveWorkers(self.store.keys, [(self.route.name, backend)])
        return ride_out(lambda: run(self.store.client, live), self.store.outage_patience_s)[0] > 0

    def _give_up(
        self,
        message: dramatiq.MessageProxy,
        request: GenerationRequest,
        attempts: list[Attempt],
        decision: GiveUp,
        failure: AttemptFailed | None,
    ) -> None:
        enqueued_us = failure.enqueued_us if failure is not None else message.message_timestamp * 1000
        now = self.store.now()
        last = attempts[-1] if attempts else None
        result = results.failed(
            message.args[0],
            request.model,
            error_type=last.outcome.value if last else "worker_error",
            message=decision.reason,
            replayable=decision.dead_letter,  # filed under dead letters: a replay can still run it
            enqueued_at=utc_from_micros(enqueued_us),
            started_at=last.started_at if last else None,
            finished_at=now,
            backend=last.backend if last else None,
            worker=self.worker_name,
            attempts=attempts,
            metadata=request.metadata,
        )
        tenant = tenant_label(message.kwargs.get("tenant"))
        if self.store.finish(result, message.kwargs.get("batch_id")):
            outcome = "dead_lettered" if decision.dead_letter else "failed"
            backend = last.backend.value if last else "none"
            self.metrics.jobs.labels(model=request.model, backend=backend, tenant=tenant, outcome=outcome).inc()
        if decision.dead_letter:
            message.fail()  # the consumer's nack files it under dead letters with this reason
            message.stuff_exception(RuntimeError(decision.reason))
        if last is not None and last.outcome is AttemptOutcome.INVALID:
            log.warning("job %s (tenant %s) refused by the server: %s", message.message_id, tenant, decision.reason)


def _elapsed_s(failure: AttemptFailed, attempt: Attempt) -> float:
    started_us = int(attempt.started_at.timestamp() * 1_000_000)
    return (started_us - failure.enqueued_us) / 1e6 + attempt.duration_s


class ReroutingByModel(dramatiq.Middleware):
    """A multi-model worker's middleware: each failed attempt goes to its own model's Rerouting (each
    has its model's route and circuit breaker)."""

    def __init__(self, by_model: dict[str, Rerouting]) -> None:
        self.by_model = by_model

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        request = message.kwargs.get("request") or {}
        rerouting = self.by_model.get(str(request.get("model")), next(iter(self.by_model.values())))
        rerouting.after_process_message(broker, message, result=result, exception=exception)
