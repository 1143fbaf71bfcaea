"""One way to open Redis for every side, with timeouts that turn an outage into an error, not a hang."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Blocking reads (XREADGROUP, XREAD) never block longer than this, so a socket timeout above it
# only fires when Redis really stopped answering.
MAX_BLOCK_MS = 2000


# Shared by the sync and asyncio clients: connecting gives up after 2 s, a silent Redis is noticed.
TIMEOUTS: dict[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": MAX_BLOCK_MS / 1000 + 3.0,
    "socket_keepalive": True,
    "health_check_interval": 15,
}


def connect(url: str) -> redis.Redis:
    """TLS, user and password all come from the URL (`rediss://user:pass@host:port/db`)."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **TIMEOUTS,
    )


# What XREAD and XREADGROUP answer: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def stream_reply(reply: Any) -> StreamReply:
    """redis-py types replies loosely; name the shape once here instead of at every call."""
    return cast(StreamReply, reply or [])


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages: redis-py takes one from the
    userinfo (`user:pass@`) or from a `password=` query argument, so both are masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    except ValueError:  # not even a URL: say nothing of it
        return "<unparsable Redis URL>"
    query = "&".join(
        f"{piece.partition('=')[0]}=***" if piece.partition("=")[0].lower() == "password" else piece
        for piece in parts.query.split("&")
    )
    # Replace the pieces in place: urlunsplit would turn `unix:///path` into `unix:/path`.
    head, mark, _ = url.partition("?")
    return head.replace(parts.netloc, netloc, 1) + (mark + query if mark else "")
