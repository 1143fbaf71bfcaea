"""The HTTP gateway's request metrics: rate, status codes and latency per route.

A plain ASGI middleware, so it needs no web framework of its own and sees every response,
including errors raised before an endpoint runs (bad JSON, 413, 429). The route label is the
matched route's path template (`/v1/genq/jobs/{job_id}`), never the raw path, so a job id never
becomes a label; paths that match no route share the label `unmatched`.

Requests and their latency also carry `tenant`: the caller's tenant as the API keys name it (a
configured name, so the label set stays small; never the key), `default` on a gateway without keys,
and `none` for a request refused before any key was accepted (a missing or unknown key, a body over
the bound). The caller check writes the tenant into the request's scope (`state`) as it accepts a
key, and this middleware reads it back once the response is sent.

Mount it with `instrument(app)`: the middleware also answers `/metrics`. A gateway run with
several uvicorn worker processes needs PROMETHEUS_MULTIPROC_DIR set (to an empty folder) before
it starts; `/metrics` then serves the sum over the processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Fast refusals take microseconds; a non-streamed completion waits for the whole generation.
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
UNMATCHED = "unmatched"
TENANT_STATE = "genq_tenant"  # the key in scope["state"] the caller check writes the tenant to
NO_TENANT = "none"
METRICS_PATH = "/metrics"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "genq_gateway_requests_total",
            "HTTP requests answered by the gateway, by route, status code and tenant.",
            ("method", "route", "status", "tenant"),
            registry=registry,
        )
        self.latency = Histogram(
            "genq_gateway_request_duration_seconds",
            "From a request's arrival to the last byte of its response (a stream's end, for SSE).",
            ("method", "route", "tenant"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "genq_gateway_requests_in_progress",
            "Requests being answered right now (open streams included).",
            ("method",),
            multiprocess_mode="livesum",
            registry=registry,
        )


class GatewayMetricsMiddleware:
    """ASGI middleware; Starlette's `app.add_middleware(GatewayMetricsMiddleware, metrics=...)`.

    With `exposition` it answers `GET /metrics` itself (uncounted), ahead of the app's routes."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, exposition: ASGIApp | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.exposition = exposition

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.exposition is not None and scope.get("path") == METRICS_PATH:
            await self.exposition(scope, receive, send)
            return
        method = str(scope.get("method", "GET"))
        status = 500  # what the client sees if the app raises before it starts a response
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        # The route is known only once the router has matched it, so in-progress has no route label.
        in_progress = self.metrics.in_progress.labels(method=method)
        in_progress.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            in_progress.dec()
            route, tenant = route_template(scope), tenant_of(scope)
            self.metrics.requests.labels(method=method, route=route, status=str(status), tenant=tenant).inc()
            self.metrics.latency.labels(method=method, route=route, tenant=tenant).observe(
                time.perf_counter() - started
            )


def route_template(scope: Scope) -> str:
    """The path template of the route the router matched (Starlette and FastAPI put it in the scope)."""
    route = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    return str(path) if path else UNMATCHED


def tenant_of(scope: Scope) -> str:
    """The tenant the caller check accepted for this request, or `none`."""
    state = scope.get("state")
    tenant = state.get(TENANT_STATE) if isinstance(state, MutableMapping) else None
    return str(tenant) if tenant else NO_TENANT


def metrics_app(registry: CollectorRegistry = REGISTRY) -> ASGIApp:
    """`/metrics` for this process, or for all gateway processes in multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
    app: ASGIApp = make_asgi_app(registry)
    return app


def instrument(app: Any, registry: CollectorRegistry = REGISTRY) -> GatewayMetrics:
    """Count every request of a Starlette/FastAPI app and serve `/metrics` on it.

    Call before the app starts serving (middleware cannot be added later)."""
    metrics = GatewayMetrics(registry)
    app.add_middleware(GatewayMetricsMiddleware, metrics=metrics, exposition=metrics_app(registry))
    return metrics
