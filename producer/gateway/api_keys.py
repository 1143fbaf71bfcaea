"""Who may call the gateway: API keys from settings or a file, matched in constant time.

A key is kept only as its SHA-256 digest. Callers are known by the key's name (configured, or
`key-` and the first 8 hex digits of its digest) in logs, Redis keys and error messages, so no
log line, Redis key or error ever carries a key. A presented token is hashed and compared with
every configured digest by `hmac.compare_digest`, without stopping at a match: how much of a key
a guess got right, and which key matched, do not show in the time an answer takes, and comparing
digests (always 32 bytes) hides how long the configured keys are.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import limits
from limits import RateLimitItem
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
UNLIMITED = "unlimited"
SHORT_KEY_CHARS = 16


def parse_rate(rate: str) -> tuple[RateLimitItem, ...]:
    """`limits` notation, several joined by `;` (`10/second;600/hour`), or `unlimited`."""
    if rate.strip().lower() == UNLIMITED:
        return ()
    return tuple(limits.parse_many(rate))


class ApiKeyEntry(BaseModel):
    """One key as configured: the key itself (or its SHA-256, so the config need not hold it) and
    its own limits; a limit left out takes the gateway's default (`GENQ_GATEWAY_KEY_*`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key: SecretStr | None = Field(default=None, min_length=1, max_length=1024)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="hex digest of the key")
    name: str | None = Field(default=None, pattern=NAME, description="shown in logs and errors instead of the key")
    rate: str | None = Field(default=None, description="requests per window, e.g. '600/minute', or 'unlimited'")
    max_queued: int | None = Field(default=None, ge=1, description="unfinished jobs at once")
    max_batches: int | None = Field(default=None, ge=0, description="unfinished batches at once")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' or 'key_sha256' for each API key")
        if self.rate is not None:
            parse_rate(self.rate)  # a ValueError names the rate string, never the key
        return self

    @property
    def digest(self) -> bytes:
        if self.key is not None:
            return hashlib.sha256(self.key.get_secret_value().encode()).digest()
        assert self.key_sha256 is not None
        return bytes.fromhex(self.key_sha256)

    @property
    def short(self) -> bool:
        return self.key is not None and len(self.key.get_secret_value()) < SHORT_KEY_CHARS


def parse_entries(value: Any) -> Any:
    """`GENQ_GATEWAY_API_KEYS` as a JSON list (of keys, or of objects with limits) or a comma list.

    Errors never quote the value: it holds keys."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a valid JSON list (at column {error.colno})") from None
    else:
        data = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(data, list):
        raise ValueError("expected a JSON list or a comma-separated list of keys")
    return [{"key": item} if isinstance(item, str) else item for item in data]


def load_file(path: Path) -> list[ApiKeyEntry]:
    """A TOML file of `[[keys]]` tables, so keys can live in a file only the gateway may read."""
    with path.expanduser().open("rb") as handle:
        data = tomllib.load(handle)
    unknown = set(data) - {"keys"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level entries {sorted(unknown)}; expected [[keys]] tables")
    return [ApiKeyEntry.model_validate(item) for item in data.get("keys", [])]


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)
    rate: tuple[RateLimitItem, ...]  # empty: no rate limit
    max_queued: int
    max_batches: int

    @property
    def rate_text(self) -> str:
        return ";".join(str(item) for item in self.rate) or UNLIMITED


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a configured key, or None when the gateway has no keys (loopback only)."""

    key: ApiKey | None

    @property
    def name(self) -> str:
        return self.key.name if self.key is not None else "anonymous"


class KeyRing:
    """The configured keys; empty means the gateway has no keys (loopback callers only)."""

    def __init__(self, keys: Sequence[ApiKey] = ()) -> None:
        names = [k.name for k in keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique; repeated: {', '.join(duplicates)}")
        if len({k.digest for k in keys}) < len(keys):
            raise ValueError("the same API key is configured twice")
        self.keys = tuple(keys)

    @classmethod
    def from_entries(cls, entries: Sequence[ApiKeyEntry], *, rate: str, max_queued: int, max_batches: int) -> KeyRing:
        keys = []
        for entry in entries:
            digest = entry.digest
            keys.append(
                ApiKey(
                    name=entry.name or f"key-{digest.hex()[:8]}",
                    digest=digest,
                    rate=parse_rate(entry.rate if entry.rate is not None else rate),
                    max_queued=entry.max_queued if entry.max_queued is not None else max_queued,
                    max_batches=entry.max_batches if entry.max_batches is not None else max_batches,
                )
            )
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, token: str) -> ApiKey | None:
        """The key this token is, comparing with every key whatever happens (see the module doc)."""
        digest = hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found
