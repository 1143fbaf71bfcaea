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

from jobcontract.admission import DEFAULT_TENANT as JOBS_DEFAULT_TENANT

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
    tenant: str | None = Field(
        default=None, pattern=NAME, description="whose work this key sees and makes; default: the key's name"
    )
    admin: bool = Field(default=False, description="sees every tenant's jobs, files and batches (operators)")
    share: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="its tenant's weight in fair share between tenants (default 1): a tenant with share 2 "
        "gets two turns to another's one when both have jobs waiting",
    )
    max_files: int | None = Field(default=None, ge=1, description="files its tenant may hold, checked on upload")
    max_file_bytes: int | None = Field(default=None, ge=1, description="bytes its tenant's files may hold")
    max_upload_bytes: int | None = Field(default=None, ge=1, description="bytes of one upload")

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
class FileBounds:
    """How much a tenant may keep in /v1/files: files, their bytes, and the bytes of one upload."""

    max_files: int
    max_bytes: int
    max_upload_bytes: int


# The gateway's defaults are GENQ_GATEWAY_TENANT_MAX_FILES, _TENANT_MAX_FILE_BYTES and _MAX_FILE_BYTES.
DEFAULT_FILE_BOUNDS = FileBounds(max_files=1000, max_bytes=1 << 30, max_upload_bytes=512 << 20)


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)
    rate: tuple[RateLimitItem, ...]  # empty: no rate limit
    max_queued: int
    max_batches: int
    tenant: str = ""  # "" is the key's own name
    admin: bool = False
    files: FileBounds = DEFAULT_FILE_BOUNDS
    share: float | None = None  # None: the tenant's share is set by another of its keys, or is 1

    def __post_init__(self) -> None:
        if not self.tenant:
            object.__setattr__(self, "tenant", self.name)

    @property
    def rate_text(self) -> str:
        return ";".join(str(item) for item in self.rate) or UNLIMITED


DEFAULT_TENANT = JOBS_DEFAULT_TENANT  # the worker's metrics label a job without a tenant the same


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a configured key, or None when the gateway has no keys (loopback only).

    Everything a caller creates belongs to its tenant, and it sees only its tenant's work, unless it
    sees all: an admin key, or any caller of a gateway without keys (one tenant, as before tenants)."""

    key: ApiKey | None

    @property
    def name(self) -> str:
        return self.key.name if self.key is not None else "anonymous"

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else DEFAULT_TENANT

    @property
    def sees_all(self) -> bool:
        return self.key is None or self.key.admin

    def file_bounds(self, default: FileBounds) -> FileBounds:
        return self.key.files if self.key is not None else default

    def may_see(self, owner: str | None) -> bool:
        """Whether an object owned by `owner` (None: made outside the gateway) is this caller's."""
        return self.sees_all or owner == self.tenant


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
        self.shares = _shares(self.keys)

    @classmethod
    def from_entries(
        cls,
        entries: Sequence[ApiKeyEntry],
        *,
        rate: str,
        max_queued: int,
        max_batches: int,
        files: FileBounds = DEFAULT_FILE_BOUNDS,
    ) -> KeyRing:
        keys = []
        for entry in entries:
            digest = entry.digest
            name = entry.name or f"key-{digest.hex()[:8]}"
            keys.append(
                ApiKey(
                    name=name,
                    digest=digest,
                    rate=parse_rate(entry.rate if entry.rate is not None else rate),
                    max_queued=entry.max_queued if entry.max_queued is not None else max_queued,
                    max_batches=entry.max_batches if entry.max_batches is not None else max_batches,
                    tenant=entry.tenant or name,
                    admin=entry.admin,
                    share=entry.share,
                    files=FileBounds(
                        max_files=entry.max_files or files.max_files,
                        max_bytes=entry.max_file_bytes or files.max_bytes,
                        max_upload_bytes=min(entry.max_upload_bytes or files.max_upload_bytes, files.max_upload_bytes),
                    ),
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


def _shares(keys: Sequence[ApiKey]) -> dict[str, float]:
    """Each tenant's weight in fair share; two keys of one tenant may not name different ones."""
    shares: dict[str, float] = {}
    for key in keys:
        if key.share is None:
            continue
        known = shares.setdefault(key.tenant, key.share)
        if known != key.share:
            raise ValueError(f"tenant {key.tenant!r} is given two shares ({known} and {key.share}) by its keys")
    return shares
