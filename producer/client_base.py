"""What Client and AsyncClient share: checking a request, the arguments of an admission, and turning
a Redis outage into GenqUnavailable. Only the round trips differ between the two clients (like httpx's
BaseClient), so a check added here holds for both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jobcontract.connection import redact
from jobcontract.keys import Keys
from jobcontract.models import GenerationRequest
from jobcontract.outage import OUTAGE_ERRORS
from jobcontract.settings import GenqSettings

RequestLike = GenerationRequest | Mapping[str, Any]


class GenqUnavailable(ConnectionError):
    """Redis could not be reached; nothing was queued. Safe to retry."""


class ClientBase:
    def __init__(self, settings: GenqSettings | None) -> None:
        self.settings = settings or GenqSettings()
        self.keys = Keys(self.settings.namespace)

    def validate(self, request: RequestLike) -> GenerationRequest:
        """Check a request against the field bounds and this deployment's limits and routes."""
        data: Any = request
        if isinstance(request, GenerationRequest):
            data = request.model_dump(exclude_unset=True)
        elif isinstance(request, Mapping):
            data = dict(request)
        # Anything else (a JSON body need not be an object) is pydantic's to refuse with a ValidationError.
        limits = self.settings.limits
        return limits.cap(GenerationRequest.model_validate(data, context={"limits": limits}))

    def admission(
        self, requests: Sequence[RequestLike], batch_id: str | None, job_ids: Sequence[str] | None
    ) -> tuple[list[GenerationRequest], dict[str, Any]]:
        """Every request checked first (nothing is queued if one is invalid), and the store's
        submit_many keywords for this deployment."""
        checked = [self.validate(r) for r in requests]
        return checked, {
            "route_for": self.settings.routes.get,
            "default_timeout_s": self.settings.default_timeout_s,
            "batch_id": batch_id,
            "job_ids": job_ids,
        }

    def _reaching_redis(self) -> ReachingRedis:
        return ReachingRedis(self.settings.redis_url)


class ReachingRedis:
    """Turn a Redis outage into one clear, retryable error naming the (redacted) URL; a context
    manager for both clients (`with` and `async with`)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        if isinstance(error, OUTAGE_ERRORS):  # a failover's READONLY and MasterNotFoundError included
            raise GenqUnavailable(f"cannot reach Redis at {redact(self.url)}: {error}") from error

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.__exit__(kind, error, tb)
