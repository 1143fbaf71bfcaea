"""What a deployment admits: checked at the door so a bad request is never queued."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobcontract.models import GenerationRequest

# Dead letters kept by default (protocol/entry.py's DeadLetterCap trims to them): here, with no Redis
# import, so settings that read them cost a worker's start nothing.
DEAD_LETTERS_MAX = 100_000
DEAD_LETTERS_MAX_AGE_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    max_prompt_chars: int
    # Logical model name -> the backends its route allows, in order of preference.
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def cap(self, request: GenerationRequest) -> GenerationRequest:
        """A request that left max_tokens to its default gets at most this deployment's cap."""
        if "max_tokens" not in request.model_fields_set and request.max_tokens > self.max_tokens:
            return request.model_copy(update={"max_tokens": self.max_tokens})
        return request

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError, with the reason a caller can act on, for anything over a limit."""
        if request.model not in self.models:
            known = ", ".join(sorted(self.models)) or "none configured"
            raise ValueError(f"unknown model {request.model!r}; known models: {known}")
        if "max_tokens" in request.model_fields_set and request.max_tokens > self.max_tokens:
            raise ValueError(f"max_tokens {request.max_tokens} is over this deployment's cap of {self.max_tokens}")
        if request.prompt_chars > self.max_prompt_chars:
            raise ValueError(f"prompt has {request.prompt_chars} characters, over the limit of {self.max_prompt_chars}")
        allowed = self.models[request.model]
        if request.backend is not None and request.backend.value not in allowed:
            raise ValueError(
                f"backend {request.backend.value!r} is not in the route of model {request.model!r} "
                f"(allowed: {', '.join(allowed)})"
            )
