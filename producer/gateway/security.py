"""The caller check in front of every endpoint: an API key, then the key's rate.

One dependency for the whole app, so no endpoint can forget it; endpoints that queue work ask for
the `Caller` it found (FastAPI solves it once per request) to hold the key to its bound on
unfinished jobs and batches. Without configured keys the gateway answers loopback callers only:
the CLI refuses to bind elsewhere, and this check refuses any other peer in case the app was
served some other way (a bare `uvicorn --host 0.0.0.0`).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import Depends, Request

from producer.gateway.api_keys import Caller
from producer.gateway.errors import ApiError
from producer.gateway.services import Services
from producer.gateway_metrics import TENANT_STATE


def bearer_token(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def loopback_peer(host: str | None) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


async def authenticate(request: Request) -> Caller:
    s: Services = request.app.state.services
    ring = s.settings.key_ring
    if not ring:
        if not loopback_peer(request.client.host if request.client else None):
            raise ApiError(
                403,
                "this gateway has no API keys configured and answers callers on its own host only",
                "permission_error",
                code="loopback_only",
            )
        return labelled(request, Caller(key=None))
    token = bearer_token(request.headers.get("authorization"))
    key = ring.match(token) if token is not None else None
    if key is None:
        raise ApiError(
            401,
            "missing or unknown API key (send Authorization: Bearer KEY)",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="genq"'},
        )
    caller = labelled(request, Caller(key=key))  # a refusal for its rate counts under its tenant too
    retry_after = await s.quotas.rate.hit(key.name, key.rate)
    if retry_after is not None:
        raise ApiError(
            429,
            f"API key {key.name!r} is over its rate limit of {key.rate_text}; retry after {retry_after:.0f}s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": f"{retry_after:.0f}"},
        )
    return caller


def labelled(request: Request, caller: Caller) -> Caller:
    """Name the caller's tenant (never its key) for the request metrics (producer.gateway_metrics)."""
    setattr(request.state, TENANT_STATE, caller.tenant)
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]
