"""What a worker measures, in Prometheus terms: base units, `genq_` prefix, bounded labels only.

Neither mlx_lm.server nor llama_cpp.server exports metrics, so the worker measures what users
watch (queue wait, first token, token gaps, end to end) around every request it sends.

Worker processes share one /metrics endpoint through prometheus-client's multiprocess mode: the
supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh folder before it spawns them (the variable
must be set before a process imports prometheus_client), serves the sum of their files, and
marks a dead process's files dead so its gauges vanish while its counters keep counting.
Gauges therefore say how they combine across processes (`multiprocess_mode`).

Labels are model, backend, outcome or reason: small fixed sets. Never a job id, prompt or worker
name; the worker is Prometheus's own `instance` label.

Jobs, tokens and latencies also carry `tenant`: whose job it was, as the gateway's API keys name it
(a configured name, never a key), or `default` for a job without one (a gateway without keys, the
Python client, `genq batch run`). The gateway puts it in the job's message at admission (kwarg
`tenant`), so the worker reads it for free: no Redis read per job, no race with the gateway naming
the job's owner just after admission, and it follows the job through retries, reroutes and replays,
which copy the message's kwargs. Attempts, retries and the servers stay per pool.
"""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from jobcontract.admission import DEFAULT_TENANT
from jobcontract.models import AttemptOutcome, Backend, GenerationRequest, GenerationResult

# From a tiny model's milliseconds to a 70B model's tens of minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

JOB = ("model", "backend")
TENANT_JOB = (*JOB, "tenant")  # per job: whose work it was
# How a job leaves a pool: finished there (succeeded, failed, cancelled, dead_lettered) or moved
# on (rerouted). A rerouted job later finishes on another pool, so throughput excludes it.
JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "dead_lettered", "rerouted")


class WorkerMetrics:
    """The metrics of one worker process serving one pool (model on backend)."""

    def __init__(self, model: str, backend: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.queue_wait = Histogram(
            "genq_queue_wait_seconds",
            "From a job's enqueue to a worker starting an attempt of it (one observation per attempt).",
            TENANT_JOB,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "genq_time_to_first_token_seconds",
            "From enqueue to the first generated token, for succeeded jobs.",
            TENANT_JOB,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "genq_inter_token_latency_seconds",
            "Gap between consecutive streamed tokens.",
            TENANT_JOB,
            buckets=TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.end_to_end = Histogram(
            "genq_end_to_end_latency_seconds",
            "From enqueue to the result, for succeeded jobs.",
            TENANT_JOB,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generation = Histogram(
            "genq_generation_seconds",
            "From a worker starting the successful attempt to its result.",
            TENANT_JOB,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.jobs = Counter(
            "genq_jobs_total",
            "Jobs leaving this pool, by outcome (see JOB_OUTCOMES) and tenant.",
            (*TENANT_JOB, "outcome"),
            registry=registry,
        )
        self.attempts = Counter(
            "genq_attempts_total", "Attempts on this pool's servers, by outcome.", (*JOB, "outcome"), registry=registry
        )
        self.reroutes = Counter(
            "genq_reroutes_total",
            "Jobs moved to another backend after failing here.",
            ("model", "from_backend", "to_backend"),
            registry=registry,
        )
        self.retries = Counter(
            "genq_retries_total",
            "Attempts retried on the same backend, by the failed attempt's outcome.",
            (*JOB, "reason"),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "genq_prompt_tokens_total", "Prompt tokens of succeeded jobs.", TENANT_JOB, registry=registry
        )
        self.prompt_cached_tokens = Counter(
            "genq_prompt_cached_tokens_total",
            "Prompt tokens of succeeded jobs that the server took from its prompt cache (a part of "
            "genq_prompt_tokens_total: their ratio is the cache hit ratio).",
            TENANT_JOB,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "genq_completion_tokens_total", "Tokens generated by succeeded jobs.", TENANT_JOB, registry=registry
        )
        self._in_flight = Gauge(
            "genq_jobs_in_flight",
            "Jobs being generated by this worker's processes.",
            JOB,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.server_up = Gauge(
            "genq_backend_servers_up",
            "This worker's backend servers answering their readiness probe (one per process).",
            JOB,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.server_restarts = Counter(
            "genq_backend_server_restarts_total",
            "Backend servers restarted after exiting or freezing.",
            JOB,
            registry=registry,
        )
        pool = {"model": model, "backend": backend}
        # The runner sets this process's count; the endpoint shows the sum over live processes.
        self.in_flight = self._in_flight.labels(**pool)
        self._create_series_at_zero(model, backend)

    def also_serving(self, model: str, backend: str) -> WorkerMetrics:
        """The same metrics for another pool of this process (a multi-model worker has one per model):
        only the in-flight gauge is bound to a pool; the rest take the model from each job."""
        view = copy.copy(self)
        view.in_flight = self._in_flight.labels(model=model, backend=backend)
        view._create_series_at_zero(model, backend)
        return view

    def _create_series_at_zero(self, model: str, backend: str) -> None:
        """A series that does not exist yet is absent, not 0: rate() and alerts would see nothing
        until the first failure. So every series of this pool starts at zero."""
        pool = {"model": model, "backend": backend}
        tenant = {**pool, "tenant": DEFAULT_TENANT}  # other tenants' series start with their first job
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(**tenant, outcome=outcome)
        for attempt in AttemptOutcome:
            self.attempts.labels(**pool, outcome=attempt.value)
            if attempt is not AttemptOutcome.SUCCEEDED:
                self.retries.labels(**pool, reason=attempt.value)
        for other in Backend:
            if other.value != backend:
                self.reroutes.labels(model=model, from_backend=backend, to_backend=other.value)
        for series in (
            self.prompt_tokens,
            self.prompt_cached_tokens,
            self.completion_tokens,
            self.queue_wait,
            self.time_to_first_token,
            self.inter_token,
            self.end_to_end,
            self.generation,
        ):
            series.labels(**tenant)
        self.server_restarts.labels(**pool)
        self.server_up.labels(**pool).set(0)
        self.in_flight.set(0)

    def observe_success(
        self, request: GenerationRequest, result: GenerationResult, token_gaps: list[float], tenant: str
    ) -> None:
        pool = {"model": request.model, "backend": result.backend.value if result.backend else "none"}
        labels = {**pool, "tenant": tenant}
        timings = result.timings
        self.jobs.labels(**labels, outcome="succeeded").inc()
        self.attempts.labels(**pool, outcome="succeeded").inc()
        self.prompt_tokens.labels(**labels).inc(result.usage.prompt_tokens)
        self.prompt_cached_tokens.labels(**labels).inc(result.usage.prompt_tokens_details.cached_tokens)
        self.completion_tokens.labels(**labels).inc(result.usage.completion_tokens)
        self.end_to_end.labels(**labels).observe(timings.total_s)
        if timings.time_to_first_token_s is not None:
            self.time_to_first_token.labels(**labels).observe(timings.time_to_first_token_s)
        if timings.generation_s is not None:
            self.generation.labels(**labels).observe(timings.generation_s)
        inter_token = self.inter_token.labels(**labels)
        for gap in token_gaps:
            inter_token.observe(gap)

    def observe_reroute(self, model: str, from_backend: str, to_backend: str, tenant: str) -> None:
        """The job left this pool for another: counted as this pool's `rerouted` outcome too."""
        self.reroutes.labels(model=model, from_backend=from_backend, to_backend=to_backend).inc()
        self.jobs.labels(model=model, backend=from_backend, tenant=tenant, outcome="rerouted").inc()


def tenant_label(tenant: Any) -> str:
    """A job message's `tenant` kwarg as a label: `default` when it names none."""
    return tenant if isinstance(tenant, str) and tenant else DEFAULT_TENANT


MODEL = ("model", "backend")
# Why a multi-model worker unloads a model (workers.models.plan.UnloadReason).
UNLOAD_REASONS = ("keep_alive", "swap", "over_budget", "crashed")
# A model's load: from a job asking to the server answering, seconds to minutes for large weights.
LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ModelMetrics:
    """A multi-model worker's models: which are loaded, loads, unloads and swaps, load time, and memory
    against the budget. Per process; the endpoint sums live processes (a worker's budget is their sum).
    A single-model worker exports the sizes and the loaded gauge too, so one panel shows every worker."""

    def __init__(self, backend: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.backend = backend
        self.loaded = Gauge(
            "genq_model_loaded",
            "1 while this worker holds the model loaded (its server runs), by model.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._loaded_count = Gauge(
            "genq_models_loaded",
            "Models this worker holds loaded now.",
            ("backend",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.loads = Counter("genq_model_loads_total", "Models loaded (servers started).", MODEL, registry=registry)
        self.failed_loads = Counter(
            "genq_model_failed_loads_total",
            "Loads whose server died or never became ready (its size is then raised to the budget).",
            MODEL,
            registry=registry,
        )
        self.unloads = Counter(
            "genq_model_unloads_total",
            "Models unloaded, by reason (keep_alive, swap, over_budget, crashed).",
            (*MODEL, "reason"),
            registry=registry,
        )
        self._swaps = Counter(
            "genq_model_swaps_total",
            "Loads that first unloaded another model to make room.",
            ("backend",),
            registry=registry,
        )
        self.load_seconds = Histogram(
            "genq_model_load_seconds",
            "From starting a model's server to it answering.",
            MODEL,
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.size = Gauge(
            "genq_model_size_bytes",
            "A model's recorded size: its files, then its server's measured memory, raised after a crash.",
            MODEL,
            multiprocess_mode="livemax",
            registry=registry,
        )
        self._used = Gauge(
            "genq_model_memory_used_bytes",
            "Recorded sizes of the models this worker holds loaded.",
            ("backend",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._budget = Gauge(
            "genq_model_memory_budget_bytes",
            "Memory this worker's loaded models may take (GENQ_MEMORY_BUDGET_GB).",
            ("backend",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        pool = {"backend": backend}
        self.loaded_count = self._loaded_count.labels(**pool)
        self.swaps = self._swaps.labels(**pool)
        self.used = self._used.labels(**pool)
        self.loaded_count.set(0)
        self.used.set(0)

    def set_budget(self, budget_bytes: int) -> None:
        """Only a multi-model worker has a budget: a single-model one exports no budget series."""
        self._budget.labels(backend=self.backend).set(budget_bytes)

    def labels(self, model: str) -> dict[str, str]:
        return {"model": model, "backend": self.backend}

    def create_series(self, model: str) -> None:
        """Every series of a model starts at zero (see WorkerMetrics._create_series_at_zero)."""
        labels = self.labels(model)
        self.loaded.labels(**labels).set(0)
        self.loads.labels(**labels)
        self.failed_loads.labels(**labels)
        self.load_seconds.labels(**labels)
        for reason in UNLOAD_REASONS:
            self.unloads.labels(**labels, reason=reason)
