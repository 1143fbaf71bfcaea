"""The job contract: what a caller asks for and what comes back.

Static bounds live on the fields so a request built anywhere is already sane; the
deployment's own limits (its max_tokens cap, its prompt size, the models it routes)
come in through the validation context, see :func:`jobcontract.admission.admit`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

from jobcontract.limits import Limits

ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Absolute ceilings that hold whatever a deployment configures.
HARD_MAX_TOKENS = 1_000_000
HARD_MAX_PROMPT_CHARS = 10_000_000


class Backend(StrEnum):
    MLX = "mlx"
    LLAMACPP = "llamacpp"


class Lane(StrEnum):
    """Interactive work is served before batch work on every worker."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=HARD_MAX_PROMPT_CHARS)


class GenerationRequest(BaseModel):
    """One generation: a prompt or a chat, for a logical model named in the routes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    prompt: str | None = Field(default=None, max_length=HARD_MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    max_tokens: int = Field(default=256, ge=1, le=HARD_MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=4
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    timeout_s: float | None = Field(
        default=None, gt=0, le=7 * 24 * 3600, description="Deadline for the whole chain of attempts."
    )
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    metadata: dict[
        Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]
    ] = Field(default_factory=dict, max_length=16)
    backend: Backend | None = Field(default=None, description="Preferred backend, within the model's route.")
    lane: Lane = Lane.INTERACTIVE
    stream: bool = Field(default=False, description="Publish tokens as they are generated.")
    prompt_cache_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Jobs given one key are placed together, where their prompt prefix is likely cached (OpenAI's "
        "prompt_cache_key); without a key the leading part of the prompt decides (jobcontract.prefix).",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        limits = info.context.get("limits") if isinstance(info.context, dict) else None
        if isinstance(limits, Limits):
            limits.check(self)
        return self

    @property
    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages or ())


class PromptTokensDetails(BaseModel):
    """OpenAI's shape, so `usage` reads the same in genq's result, the gateway and batch output."""

    cached_tokens: int = Field(
        default=0,
        ge=0,
        description="Prompt tokens the server took from its prompt cache instead of computing them "
        "(0 when the backend reports none).",
    )


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    SERVER_ERROR = "server_error"
    UNAVAILABLE = "unavailable"
    SERVER_CRASHED = "server_crashed"  # the server died while answering: the job is a suspect
    INVALID = "invalid"
    CANCELLED = "cancelled"


class Attempt(BaseModel):
    """One try of a job on one backend server; a result lists every one."""

    backend: Backend
    worker: str
    outcome: AttemptOutcome
    started_at: datetime
    duration_s: float
    error: str | None = None
    solo: bool = Field(default=False, description="Ran alone on its server (a suspect after a crash).")


class Timings(BaseModel):
    """Wall-clock instants on the Redis server's clock, so queue wait is free of host clock skew."""

    enqueued_at: datetime
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started_at is None else _seconds(self.enqueued_at, self.started_at)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else _seconds(self.enqueued_at, self.first_token_at)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def generation_s(self) -> float | None:
        return None if self.started_at is None else _seconds(self.started_at, self.finished_at)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_s(self) -> float:
        return _seconds(self.enqueued_at, self.finished_at)


class JobError(BaseModel):
    type: str
    message: str
    retryable: bool = False


class GenerationResult(BaseModel):
    job_id: str
    model: str
    state: JobState
    text: str = ""
    finish_reason: Literal["stop", "length", "cancelled", "error"] | None = None
    usage: Usage = Field(default_factory=Usage)
    backend: Backend | None = None
    worker: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    timings: Timings
    error: JobError | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the time from first token to the end: the decode rate."""
        start = self.timings.first_token_at or self.timings.started_at
        if start is None or self.usage.completion_tokens == 0:
            return None
        span = _seconds(start, self.timings.finished_at)
        return self.usage.completion_tokens / span if span > 0 else None

    @property
    def ok(self) -> bool:
        return self.state is JobState.SUCCEEDED


class JobStatus(BaseModel):
    """Where a job is now, for callers polling from elsewhere."""

    job_id: str
    state: JobState
    model: str
    queue: str
    lane: Lane
    backend: Backend | None = None
    worker: str | None = None
    starts: int = Field(default=0, description="How many times a worker began this job.")
    cancel_requested: bool = False
    enqueued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    batch_id: str | None = None


class TokenEvent(BaseModel):
    """A piece of generated text as it arrives, for callers that stream."""

    job_id: str
    index: int
    text: str


def utc_from_micros(micros: int) -> datetime:
    """Redis TIME, kept as integer microseconds so Lua never rounds it."""
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())
