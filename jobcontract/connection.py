"""One way to open Redis for every side, with timeouts that turn an outage into an error, not a hang."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from jobcontract.durability import attach, split_url
from jobcontract.outage import PatientRetry
from jobcontract.sentinel import is_sentinel_url, parse_sentinel_url
from jobcontract.sentinel_connections import (
    AsyncMasterConnection,
    AsyncMasterSSLConnection,
    MasterConnection,
    MasterSSLConnection,
)

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
    """TLS, user and password all come from the URL (`rediss://user:pass@host:port/db`); a
    `sentinel://` URL (jobcontract.sentinel) gives a client that asks the sentinels for the master
    on every new connection, so after a failover it reconnects to the new one by itself."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
    return cast(redis.Redis, _open(url, redis.Redis, Sentinel, retry, (MasterConnection, MasterSSLConnection)))


def connect_async(url: str, *, patience_s: float = 0.0) -> aioredis.Redis:
    """As connect, for asyncio, with the same retries: a pooled connection to a master that died
    or was demoted fails once and is replaced, instead of failing its caller's request. With a
    `patience_s`, a call rides out an outage (a failover) for that long before failing
    (jobcontract.outage.PatientRetry): the gateway's choice, not a caller's."""
    retry = PatientRetry(patience_s) if patience_s > 0 else AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2)
    classes = (AsyncMasterConnection, AsyncMasterSSLConnection)
    return cast(aioredis.Redis, _open(url, aioredis.Redis, AsyncSentinel, retry, classes))


def _open(url: str, redis_class: Any, sentinel_class: Any, retry: Any, master_classes: tuple[type, type]) -> Any:
    """One recipe for both clients: timeouts, retries on a lost connection, Sentinel, durability."""
    plain, durability = split_url(url)
    options = {"retry": retry, "retry_on_error": [redis.ConnectionError, redis.TimeoutError], **TIMEOUTS}
    if not is_sentinel_url(plain):
        return attach(redis_class.from_url(plain, **options), durability)
    config = parse_sentinel_url(plain)
    sentinels = sentinel_class(
        list(config.sentinels),
        sentinel_kwargs={**config.sentinel_kwargs(), **SENTINEL_TIMEOUTS},
        **config.master_kwargs(),
    )
    # Connections whose retries ask the sentinels again (jobcontract.sentinel_connections).
    options["connection_class"] = master_classes[1] if config.ssl else master_classes[0]
    return attach(sentinels.master_for(config.service, redis_class=redis_class, **options), durability)


# Asking a sentinel where the master is must be quick: a dead sentinel is skipped for the next.
SENTINEL_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}


# What XREAD and XREADGROUP answer: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def stream_reply(reply: Any) -> StreamReply:
    """redis-py types replies loosely; name the shape once here instead of at every call."""
    return cast(StreamReply, reply or [])


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages: redis-py takes one from the
    userinfo (`user:pass@`) or from a `password=` query argument, so both are masked; so is a
    Sentinel URL's `sentinel_password=`, and every piece of a kombu-style `a;b` list."""
    if ";" in url:
        return ";".join(redact(piece) for piece in url.split(";"))
    if is_sentinel_url(url):  # several hosts: urlsplit cannot read a port, so mask by hand
        head, mark, query = url.partition("?")
        scheme, _, rest = head.partition("://")
        userinfo, at, tail = rest.partition("/")[0].rpartition("@")
        if at and ":" in userinfo:
            head = f"{scheme}://{userinfo.partition(':')[0]}:***@{tail}" + rest[len(rest.partition("/")[0]) :]
        return head + (mark + _mask_query(query) if mark else "")
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    except ValueError:  # not even a URL: say nothing of it
        return "<unparsable Redis URL>"
    query = _mask_query(parts.query)
    # Replace the pieces in place: urlunsplit would turn `unix:///path` into `unix:/path`.
    head, mark, _ = url.partition("?")
    return head.replace(parts.netloc, netloc, 1) + (mark + query if mark else "")


def _mask_query(query: str) -> str:
    return "&".join(
        f"{piece.partition('=')[0]}=***" if piece.partition("=")[0].lower() in _SECRET_OPTIONS else piece
        for piece in query.split("&")
    )


_SECRET_OPTIONS = ("password", "sentinel_password")
