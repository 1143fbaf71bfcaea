"""Every error in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), so SDKs built
for OpenAI raise their usual exceptions, with a status a caller can act on."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from jobcontract.durability import NotReplicated
from jobcontract.jobs import IdempotencyConflict, ModelTooLarge, QueueFull, UnknownJob
from jobcontract.outage import OUTAGE_ERRORS
from producer.batch.book import UnknownBatch
from producer.client import GenqUnavailable
from producer.openai_format import error_body, validation_message


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, param=param, code=code)
        self.headers = headers


def unknown_model(model: str, known: list[str]) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist; known models: {', '.join(sorted(known)) or 'none'}",
        param="model",
        code="model_not_found",
    )


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _json(error.status, error.body, error.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = dict(error.errors()[0]) if error.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        param = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
            return _json(400, error_body(message, "invalid_request_error", code="invalid_json"))
        if first.get("type") == "extra_forbidden":
            message = f"unsupported parameter {param!r}"
        elif first.get("type") == "missing":
            message = f"missing required parameter {param!r}"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _json(400, error_body(message, "invalid_request_error", param=param, code="invalid_request"))

    @app.exception_handler(ValidationError)
    async def invalid(_request: Request, error: ValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return _json(400, error_body(message, "invalid_request_error", param=param, code="invalid_request"))

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, error: QueueFull) -> JSONResponse:
        retry = str(max(1, math.ceil(error.retry_after_s)))
        body = error_body(str(error), "rate_limit_error", code="queue_full")
        return _json(429, body, {"Retry-After": retry})

    @app.exception_handler(ModelTooLarge)
    async def too_large(_request: Request, error: ModelTooLarge) -> JSONResponse:
        """400, not 503: no live worker could ever hold the model, so retrying the same request is
        useless until a worker with a larger budget joins."""
        body = error_body(str(error), "invalid_request_error", param="model", code="model_too_large")
        return _json(400, body)

    @app.exception_handler(IdempotencyConflict)
    async def reused_key(_request: Request, error: IdempotencyConflict) -> JSONResponse:
        # The key as stored is the tenant's scoped form: never shown, the caller knows its own key.
        message = (
            f"this Idempotency-Key was already used for a different request (job {error.job_id}); "
            "a new request needs a new key"
        )
        return _json(409, error_body(message, "invalid_request_error", code="idempotency_key_reused"))

    @app.exception_handler(UnknownJob)
    async def unknown_job(_request: Request, error: UnknownJob) -> JSONResponse:
        return _json(404, error_body(str(error.args[0]), "invalid_request_error", code="not_found"))

    @app.exception_handler(UnknownBatch)
    async def unknown_batch(_request: Request, error: UnknownBatch) -> JSONResponse:
        return _json(404, error_body(str(error.args[0]), "invalid_request_error", code="not_found"))

    @app.exception_handler(TimeoutError)
    async def timed_out(_request: Request, error: TimeoutError) -> JSONResponse:
        return _json(504, error_body(f"timed out waiting for the result: {error}", "timeout", code="timeout"))

    @app.exception_handler(GenqUnavailable)
    async def unavailable(_request: Request, error: GenqUnavailable) -> JSONResponse:
        return _json(503, error_body(str(error), "service_unavailable", code="redis_unavailable"), {"Retry-After": "1"})

    async def redis_down(_request: Request, error: Exception) -> JSONResponse:
        """Redis down, or failing over (no master known yet, or a demoted one answering READONLY)."""
        body = error_body(f"cannot reach Redis: {error}", "service_unavailable", code="redis_unavailable")
        return _json(503, body, {"Retry-After": "1"})

    for outage in OUTAGE_ERRORS:
        app.add_exception_handler(outage, redis_down)

    @app.exception_handler(NotReplicated)
    async def not_replicated(_request: Request, error: NotReplicated) -> JSONResponse:
        body = error_body(str(error), "service_unavailable", code="not_replicated")
        return _json(503, body, {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))})

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _json(error.status_code, error_body(str(error.detail), kind), dict(error.headers or {}))
