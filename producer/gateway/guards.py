"""What stands in front of every endpoint: a bound on request bodies, and the caller check.

The caller check is one dependency, so API keys with per-key limits (another issue) replace its
body without touching any endpoint."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from producer.gateway.errors import ApiError
from producer.openai_format import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Caller:
    key: str | None  # None: anonymous (no keys configured, loopback only)


def authenticate(request: Request) -> Caller:
    keys: list[str] = request.app.state.services.settings.gateway_api_keys
    if not keys:
        return Caller(key=None)
    header = request.headers.get("authorization", "")
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    for key in keys:
        if token and hmac.compare_digest(token.encode(), key.encode()):
            return Caller(key=key)
    raise ApiError(
        401,
        "missing or unknown API key (send Authorization: Bearer KEY)",
        "authentication_error",
        code="invalid_api_key",
    )


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over the bound with 413, whether the client declared the length or streams it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_file_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_file_bytes if str(scope.get("path", "")).startswith("/v1/files") else self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        async def noting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except _TooLarge:
            if not started:
                await _refuse(send, limit)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body(f"request body over the limit of {limit} bytes", "invalid_request_error", code="body_too_large")
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
