"""Redis behind Sentinel, named by one URL, so every side (which opens Redis from `GENQ_REDIS_URL`
alone) follows a failover without a setting of its own.

Two spellings are read, the ones users of redis-py and Celery/kombu already write:

- `sentinel://[user:pass@]host1:26379,host2:26379/mymaster[/db][?options]`: every sentinel, then
  the master's service name, then the database.
- kombu's `sentinel://[:pass@]host1:26379;sentinel://[:pass@]host2:26379[/db]?master_name=mymaster`:
  one URL per sentinel joined by `;`, the service in `master_name` (or `GENQ_REDIS_SENTINEL_MASTER`).

As in kombu, the credentials in the userinfo are the master's (and replicas'); the sentinels' own
are `sentinel_username` / `sentinel_password` (kombu's `sentinel_kwargs`). `sentinels://` (or
`ssl=true`) speaks TLS to the sentinels and the master alike; `ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile` and `ssl_cert_reqs` apply to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

SCHEMES = ("sentinel", "sentinels")
DEFAULT_SENTINEL_PORT = 26379
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = {"master_name", "service_name", "db", "sentinel_username", "sentinel_password", "ssl", *SSL_OPTIONS}
# Read by jobcontract.durability from any Redis URL, not by the connection itself.
DURABILITY_OPTIONS = ("min_replicas", "wait_ms")


@dataclass(frozen=True)
class SentinelConfig:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    ssl_options: dict[str, str] = field(default_factory=dict)

    def master_kwargs(self) -> dict[str, Any]:
        """What redis-py's Sentinel passes to connections to the master."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.ssl:
            kwargs |= {"ssl": True, **self.ssl_options}
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """What it passes to connections to the sentinels (their own credentials, same TLS)."""
        kwargs: dict[str, Any] = {"username": self.sentinel_username, "password": self.sentinel_password}
        if self.ssl:
            kwargs |= {"ssl": True, **self.ssl_options}
        return kwargs


def is_sentinel_url(url: str) -> bool:
    return url.partition(":")[0].lower() in SCHEMES


def parse_sentinel_url(url: str) -> SentinelConfig:
    """ValueError, naming what is wrong but never the password, for anything else."""
    pieces = [p for p in url.split(";") if p.strip()]
    if not pieces or not all(is_sentinel_url(p) for p in pieces):
        raise ValueError("a Sentinel URL starts with sentinel:// or sentinels://")
    options: dict[str, str] = {}
    sentinels: list[tuple[str, int]] = []
    service, db = "", ""
    username = password = None
    tls = False
    for piece in pieces:
        scheme, _, rest = piece.strip().partition("://")
        tls = tls or scheme.lower() == "sentinels"
        rest, _, query = rest.partition("?")
        options |= dict(parse_qsl(query, keep_blank_values=True))
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or username
            password = unquote(secret) if colon else password
        sentinels += [_address(h) for h in hosts.split(",") if h]
        segments = [s for s in path.split("/") if s]
        if len(pieces) == 1 and segments:  # sentinel://hosts/service[/db]
            service, db = segments[0], (segments[1] if len(segments) > 1 else db)
        elif segments:  # kombu: sentinel://host/db
            db = segments[0]
    unknown = set(options) - _OPTIONS - set(DURABILITY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown Sentinel URL option(s): {', '.join(sorted(unknown))}")
    service = options.get("master_name") or options.get("service_name") or service
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel host:port")
    if not service:
        raise ValueError("a Sentinel URL names the master's service (sentinel://hosts/mymaster or ?master_name=)")
    db = options.get("db", db) or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    return SentinelConfig(
        sentinels=tuple(sentinels),
        service=unquote(service),
        db=int(db),
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=tls or options.get("ssl", "").lower() in ("1", "true", "yes", "required"),
        ssl_options={k: v for k, v in options.items() if k in SSL_OPTIONS},
    )


def with_master_name(url: str, master: str) -> str:
    """The URL with the service named, unless it names one already (GENQ_REDIS_SENTINEL_MASTER)."""
    if not is_sentinel_url(url) or "master_name=" in url or "service_name=" in url:
        return url
    pieces = url.split(";")
    single = pieces[0].partition("://")[2].partition("?")[0]
    if len(pieces) == 1 and "/" in single and not single.partition("/")[2].partition("/")[0].isdigit():
        return url  # sentinel://hosts/service already
    return url + ("&" if "?" in url else "?") + f"master_name={master}"


def _address(text: str) -> tuple[str, int]:
    host, port = text, str(DEFAULT_SENTINEL_PORT)
    if text.startswith("["):  # [::1]:26379
        host, _, tail = text[1:].partition("]")
        port = tail.lstrip(":") or port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a sentinel address is host:port, not {text!r}")
    return host, int(port)
