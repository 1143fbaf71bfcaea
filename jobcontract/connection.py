"""One way to open Redis for every side, with timeouts that turn an outage into an error, not a hang."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Blocking reads (XREADGROUP, XREAD) never block longer than this, so a socket timeout above it
# only fires when Redis really stopped answering.
MAX_BLOCK_MS = 2000


def connect(url: str) -> redis.Redis:
    """TLS, user and password all come from the URL (`rediss://user:pass@host:port/db`)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=MAX_BLOCK_MS / 1000 + 3.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


# What XREAD and XREADGROUP answer: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def stream_reply(reply: Any) -> StreamReply:
    """redis-py types replies loosely; name the shape once here instead of at every call."""
    return cast(StreamReply, reply or [])


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
