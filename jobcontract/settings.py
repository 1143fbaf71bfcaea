"""Settings every side shares, from `GENQ_` environment variables; passed explicitly, never global."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobcontract.limits import DEAD_LETTERS_MAX, DEAD_LETTERS_MAX_AGE_S, Limits
from jobcontract.routes import Routes
from jobcontract.sentinel import is_sentinel_url, parse_sentinel_url, with_master_name

if TYPE_CHECKING:  # both import redis (a third of a second): `genq worker` starts its servers first
    from jobcontract.outage import OutagePolicy
    from jobcontract.protocol.entry import DeadLetterCap


class GenqSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis://, rediss:// (TLS), unix://, or sentinel:// / sentinels:// (Redis Sentinel, see "
        "jobcontract.sentinel); user and password go in the URL.",
    )
    redis_sentinel_master: str | None = Field(
        default=None, description="The master's service name, for a kombu-style sentinel:// URL that names none."
    )
    redis_min_replicas: int | None = Field(
        default=None, ge=0, description="Replicas that must confirm an admission or result (WAIT); 1 with Sentinel."
    )
    redis_wait_ms: int | None = Field(default=None, gt=0, description="How long WAIT waits for them (500 ms).")
    redis_outage_patience_s: float = Field(
        default=60.0,
        ge=0,
        description="How long work under way (a worker's job, a batch file run) waits out one Redis outage "
        "before giving up; see jobcontract.outage.",
    )

    @model_validator(mode="after")
    def _fold_redis_options(self) -> Self:
        """Fold the Sentinel and WAIT settings into the URL, the one thing every side opens Redis from."""
        url = self.redis_url
        if self.redis_sentinel_master and is_sentinel_url(url):
            url = with_master_name(url, self.redis_sentinel_master)
        for name, value in (("min_replicas", self.redis_min_replicas), ("wait_ms", self.redis_wait_ms)):
            if value is not None and f"{name}=" not in url:
                url += ("&" if "?" in url else "?") + f"{name}={value}"
        if is_sentinel_url(url):
            parse_sentinel_url(url)  # a malformed Sentinel URL fails at start-up, not at the first call
        self.redis_url = url
        return self

    namespace: str = Field(default="genq", pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every Redis key.")
    routes_file: Path | None = Field(default=None, description="TOML model routes; the tiny model if unset.")
    models_dir: Path = Field(default=Path("~/.cache/genq/models").expanduser())
    result_ttl_s: int = Field(default=24 * 3600, ge=60, description="How long results stay in Redis.")
    default_timeout_s: float = Field(default=600.0, gt=0, description="A job's deadline when it names none.")
    max_tokens_cap: int = Field(default=4096, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_queued_jobs: int = Field(default=100_000, ge=1, description="Per queue; past it, submits are refused.")
    dead_letters_max: int = Field(
        default=DEAD_LETTERS_MAX,
        ge=1,
        description="Dead letters kept: each one filed trims the oldest past this count (XADD MAXLEN ~).",
    )
    dead_letters_max_age_s: float = Field(
        default=DEAD_LETTERS_MAX_AGE_S,
        ge=0,
        description="Dead letters older than this are trimmed when another is filed (XTRIM MINID ~, Redis "
        "6.2+); 0 keeps them until the count cap.",
    )

    @property
    def dead_letter_cap(self) -> DeadLetterCap:
        from jobcontract.protocol.entry import DeadLetterCap

        return DeadLetterCap(self.dead_letters_max, self.dead_letters_max_age_s)

    @property
    def outage_policy(self) -> OutagePolicy:
        """The one Redis-outage policy for work already under way (see jobcontract.outage)."""
        from jobcontract.outage import OutagePolicy

        return OutagePolicy(self.redis_outage_patience_s)

    @cached_property
    def routes(self) -> Routes:
        if self.routes_file is None:
            return Routes.embedded(self.models_dir.expanduser())
        return Routes.from_file(self.routes_file.expanduser())

    @cached_property
    def limits(self) -> Limits:
        return Limits(
            max_tokens=self.max_tokens_cap,
            max_prompt_chars=self.max_prompt_chars,
            models=self.routes.allowed_backends(),
        )
