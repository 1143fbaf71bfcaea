"""The gateway's own settings (`GENQ_GATEWAY_*`), on top of the shared ones."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from jobcontract.settings import GenqSettings
from producer.gateway.api_keys import ApiKeyEntry, FileBounds, KeyRing, load_file, parse_entries, parse_rate


class GatewaySettings(GenqSettings):
    # Errors must never quote a value: the keys are secrets (see producer/gateway/api_keys.py).
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", hide_input_in_errors=True)

    gateway_host: str = Field(default="127.0.0.1", description="Loopback only unless API keys are configured.")
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    gateway_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="JSON request bodies.")
    gateway_max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="Uploads to /v1/files.")
    gateway_api_keys: Annotated[list[ApiKeyEntry], NoDecode] = Field(
        default_factory=list,
        description='Bearer keys callers must send: "k1,k2", \'["k1", "k2"]\' or \'[{"key": "k1", "name": "svc", '
        '"rate": "60/minute", "max_queued": 100, "max_batches": 2}]\'.',
    )
    gateway_api_keys_file: Path | None = Field(default=None, description="A TOML file of [[keys]] tables, as above.")
    gateway_key_rate: str = Field(default="1200/minute", description="Each key's default rate ('unlimited': none).")
    gateway_key_max_queued: int = Field(default=1000, ge=1, description="Each key's default bound on unfinished jobs.")
    gateway_key_max_batches: int = Field(default=8, ge=0, description="Each key's default bound on unfinished batches.")
    gateway_tenant_max_files: int = Field(default=1000, ge=1, description="Files one tenant may hold in /v1/files.")
    gateway_tenant_max_file_bytes: int = Field(
        default=1 << 30,
        ge=1,
        description="Bytes one tenant's files may hold in /v1/files (they live in Redis's memory).",
    )
    gateway_max_batch_lines: int = Field(default=100_000, ge=1, description="Lines in one batch input file.")
    gateway_max_wait_s: float = Field(default=300.0, gt=0, description="Longest wait on /v1/genq/jobs/{id}/result.")
    gateway_shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM: waiters are answered 503 at once, other requests get this long, then are cut off.",
    )
    gateway_access_log: bool = Field(
        default=False,
        description="uvicorn's line per request (off: it cost a measurable share of the CPU per job; the "
        "Prometheus metrics count requests).",
    )
    gateway_redis_patience_s: float = Field(
        default=3.0,
        ge=0,
        description="How long a request rides out a Redis outage (a Sentinel failover) before its 503; keep it "
        "below callers' timeouts.",
    )

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        return parse_entries(value)

    @field_validator("gateway_key_rate")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @cached_property
    def key_ring(self) -> KeyRing:
        entries = list(self.gateway_api_keys)
        if self.gateway_api_keys_file is not None:
            entries += load_file(self.gateway_api_keys_file)
        return KeyRing.from_entries(
            entries,
            rate=self.gateway_key_rate,
            max_queued=self.gateway_key_max_queued,
            max_batches=self.gateway_key_max_batches,
            files=self.file_bounds,
        )

    @property
    def file_bounds(self) -> FileBounds:
        """Each tenant's bounds in /v1/files unless its key names its own."""
        return FileBounds(
            max_files=self.gateway_tenant_max_files,
            max_bytes=self.gateway_tenant_max_file_bytes,
            max_upload_bytes=self.gateway_max_file_bytes,
        )

    @property
    def loopback_only(self) -> bool:
        return not self.key_ring


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
