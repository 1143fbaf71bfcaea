"""The job contract shared by callers and workers: models, limits, routes, queue names, Redis wiring."""

from jobcontract.models import (
    Backend,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    JobState,
    JobStatus,
    Lane,
)
from jobcontract.settings import GenqSettings

__all__ = [
    "Backend",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "GenqSettings",
    "JobState",
    "JobStatus",
    "Lane",
]
