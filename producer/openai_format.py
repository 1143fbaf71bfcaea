"""OpenAI request and response shapes, mapped to and from genq's job contract.

One mapping serves the HTTP gateway and the batch runner, so a body that the gateway accepts is
exactly a body a batch line may carry. Bodies are strict: a parameter genq cannot honour is refused
by name instead of being silently dropped, because a caller who sets `logprobs` expects logprobs.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobcontract.models import GenerationResult, JobState, Lane

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
Endpoint = Literal["/v1/completions", "/v1/chat/completions"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Body(BaseModel):
    """Fields both endpoints share. `None` means "not given": genq's defaults and caps apply."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="genq generates one choice per request.")
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(default=None, description="Returned with the genq result.")
    prompt_cache_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Requests with one key are placed where their prompt prefix is likely cached.",
    )
    # A deadline under a second cannot cover queueing and a first token: refuse it rather than fail the job.
    timeout_s: float | None = Field(
        default=None, ge=1.0, le=7 * 24 * 3600, description="genq extension: deadline of the whole job, in seconds."
    )


class CompletionBody(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = Field(default=None, max_length=64, description="Accepted and ignored.")


class ChatBody(_Body):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")


Body = CompletionBody | ChatBody


def parse_body(endpoint: str, data: Any) -> Body:
    """Validate a request body for an endpoint; raises pydantic.ValidationError."""
    model = ChatBody if endpoint == CHAT_URL else CompletionBody
    return model.model_validate(data)


def to_request(
    body: Body,
    *,
    lane: Lane = Lane.INTERACTIVE,
    idempotency_key: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The GenerationRequest fields for an OpenAI body (validated against limits by the client)."""
    request: dict[str, Any] = {"model": body.model, "lane": lane.value}
    if isinstance(body, ChatBody):
        request["messages"] = [_message(m) for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        request["prompt"] = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        max_tokens = body.max_tokens
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "timeout_s", "prompt_cache_key"):
        value = getattr(body, name)
        if value is not None:
            request[name] = value
    if body.stop is not None:
        request["stop"] = body.stop
    merged = {**(body.metadata or {}), **(metadata or {})}
    if merged:
        request["metadata"] = merged
    if idempotency_key is not None:
        request["idempotency_key"] = idempotency_key
    if body.stream:
        request["stream"] = True
    return request


def _message(message: ChatMessageIn) -> dict[str, str]:
    content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """The first problem of a pydantic error as (message, param), worded for an API caller."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return f"unsupported parameter {param!r}", param
    if first["type"] == "missing":
        return f"missing required parameter {param!r}", param
    message = str(first["msg"]).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


# -- responses -------------------------------------------------------------------------------------


def usage(result: GenerationResult) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` as OpenAI reports it (0 on a miss)."""
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": result.usage.prompt_tokens_details.cached_tokens},
    }


def response_id(endpoint: str, job_id: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT_URL else "cmpl-") + job_id


def response_body(endpoint: str, result: GenerationResult) -> dict[str, Any]:
    """A succeeded job as an OpenAI completion or chat completion, with genq's timings alongside."""
    finish = result.finish_reason if result.finish_reason in ("stop", "length") else "stop"
    created = int(result.timings.enqueued_at.timestamp())
    if endpoint == CHAT_URL:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": finish,
            "logprobs": None,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {
        "id": response_id(endpoint, result.job_id),
        "object": kind,
        "created": created,
        "model": result.model,
        "choices": [choice],
        "usage": usage(result),
        "genq": genq_extension(result),
    }


def genq_extension(result: GenerationResult) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "backend": result.backend.value if result.backend else None,
        "timings": result.timings.model_dump(mode="json"),
        "tokens_per_s": result.tokens_per_s,
        "attempts": len(result.attempts),
    }


def chunk(
    endpoint: str,
    job_id: str,
    model: str,
    created: int,
    *,
    text: str | None = None,
    finish_reason: str | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One server-sent event of a streamed completion, in OpenAI's chunk format."""
    if endpoint == CHAT_URL:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {
        "id": response_id(endpoint, job_id),
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(endpoint: str, result: GenerationResult, created: int) -> dict[str, Any]:
    return {
        "id": response_id(endpoint, result.job_id),
        "object": "chat.completion.chunk" if endpoint == CHAT_URL else "text_completion",
        "created": created,
        "model": result.model,
        "choices": [],
        "usage": usage(result),
    }


def error_body(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def failure(result: GenerationResult) -> tuple[int, dict[str, Any]]:
    """An unsuccessful job as an HTTP status and an OpenAI error body."""
    message = result.error.message if result.error else f"job {result.state.value}"
    if result.state is JobState.CANCELLED:
        return 409, error_body(message, "cancelled", code="cancelled")
    code = result.error.type if result.error else "generation_failed"
    return 502, error_body(message, "server_error", code=code)


def now_s() -> int:
    return int(time.time())
