"""One completion against an OpenAI-compatible backend server: streamed when someone streams the
job, plain (one whole answer, see workers/plain_client.py) when nobody does.

Streaming is what lets a worker see the first token (time to first token), notice a server that
froze mid-answer (the gap between tokens), and abort a cancelled job between two tokens; it costs
~0.25 ms of worker CPU per token, so only jobs whose tokens someone reads pay for it.
Every streamed read has its own timeout: nothing else can interrupt a blocking socket read.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from jobcontract.models import AttemptOutcome, GenerationRequest, PromptTokensDetails, Usage
from workers.plain_client import PlainCancelled, PlainFailure, plain_budget_s, post_json
from workers.servers.specs import ServerSpec


class BackendError(Exception):
    def __init__(self, outcome: AttemptOutcome, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retryable = retryable


class Cancelled(Exception):
    """The caller cancelled the job while it ran; the server request was closed."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None  # monotonic
    finished_at: float  # monotonic
    token_gaps: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # of prompt_tokens, taken from the server's prompt cache

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )


@dataclass(frozen=True)
class Timeouts:
    first_token_s: float
    between_tokens_s: float
    deadline: float  # monotonic instant past which the job is out of time


def build_payload(request: GenerationRequest, spec: ServerSpec, *, stream: bool = True) -> tuple[str, dict[str, Any]]:
    payload: dict[str, Any] = {
        **spec.request_defaults,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": stream,
    }
    if stream and spec.sends_usage_when_streaming:
        payload["stream_options"] = {"include_usage": True}
    if spec.request_model is not None:
        payload["model"] = spec.request_model
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.messages is not None:
        payload["messages"] = [m.model_dump() for m in request.messages]
        return "/v1/chat/completions", payload
    payload["prompt"] = request.prompt
    return "/v1/completions", payload


def complete(
    client: httpx.Client,
    base_url: str,
    request: GenerationRequest,
    spec: ServerSpec,
    timeouts: Timeouts,
    *,
    on_text: Callable[[int, str], None] | None = None,
    cancelled: threading.Event | None = None,
    plain: bool = False,
    stalled: Callable[[], bool] | None = None,
) -> Completion:
    """Streamed (per-token `on_text`, first token and gaps timed) unless `plain`."""
    if plain:
        return complete_plain(base_url, request, spec, timeouts, cancelled=cancelled, stalled=stalled)
    path, payload = build_payload(request, spec)
    started = time.monotonic()
    read_timeout = max(0.001, min(max(timeouts.first_token_s, timeouts.between_tokens_s), timeouts.deadline - started))
    timeout = httpx.Timeout(connect=min(2.0, read_timeout), read=read_timeout, write=5.0, pool=read_timeout)
    pieces: list[str] = []
    gaps: list[float] = []
    first_token_at: float | None = None
    last_token_at = started
    finish_reason: str | None = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    events = 0
    try:
        with client.stream("POST", base_url + path, json=payload, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise _http_error(response)
            for chunk in _events(response.iter_lines()):
                events += 1
                now = time.monotonic()
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled()
                if now > timeouts.deadline:
                    raise BackendError(AttemptOutcome.TIMEOUT, "job deadline passed while generating", retryable=False)
                if first_token_at is None and now - started > timeouts.first_token_s:
                    raise BackendError(
                        AttemptOutcome.TIMEOUT, f"no first token after {timeouts.first_token_s:.1f}s", retryable=True
                    )
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("timings"):
                    timings = chunk["timings"]
                for choice in chunk.get("choices") or ():
                    text = _choice_text(choice)
                    if text:
                        if first_token_at is None:
                            first_token_at = now
                        else:
                            gaps.append(now - last_token_at)
                        last_token_at = now
                        if on_text is not None:
                            on_text(len(pieces), text)
                        pieces.append(text)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    except httpx.TimeoutException as error:
        phase = "first token" if first_token_at is None else "next token"
        raise BackendError(
            AttemptOutcome.TIMEOUT, f"{spec.name} sent no {phase} in time ({error!r})", retryable=True
        ) from error
    except httpx.ConnectError as error:  # nobody listening: the server is down, not hurt by this job
        raise BackendError(AttemptOutcome.UNAVAILABLE, f"{spec.name}: {error!r}", retryable=True) from error
    except httpx.TransportError as error:  # reset or closed mid-stream: the server died under this job
        raise BackendError(AttemptOutcome.CONNECTION_ERROR, f"{spec.name}: {error!r}", retryable=True) from error
    if events == 0:
        raise _empty_stream(client, base_url + path, payload, spec, timeout)
    if finish_reason is None:
        # mlx_lm.server answers in HTTP/1.0 without a length: a server killed mid-answer looks like
        # a normal end of body. Only a finish_reason says the answer is whole.
        raise BackendError(
            AttemptOutcome.CONNECTION_ERROR,
            f"{spec.name} stopped after {len(pieces)} tokens without finishing",
            retryable=True,
        )
    completion_tokens = int(usage.get("completion_tokens") or len(pieces))
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return Completion(
        text="".join(pieces),
        finish_reason="stop" if finish_reason == "stop" else "length",
        prompt_tokens=prompt_tokens,
        # llama_cpp.server can count past max_tokens; callers are promised the cap.
        completion_tokens=min(completion_tokens, request.max_tokens),
        first_token_at=first_token_at,
        finished_at=time.monotonic(),
        token_gaps=gaps,
        cached_tokens=cached_prompt_tokens(usage, timings, prompt_tokens),
    )


def complete_plain(
    base_url: str,
    request: GenerationRequest,
    spec: ServerSpec,
    timeouts: Timeouts,
    *,
    cancelled: threading.Event | None = None,
    stalled: Callable[[], bool] | None = None,
) -> Completion:
    """The whole answer in one response, bounded by first-token timeout + per-token budget x
    max_tokens, capped by the deadline. No first token is seen, so none is reported."""
    path, payload = build_payload(request, spec, stream=False)
    started = time.monotonic()
    budget = plain_budget_s(timeouts.first_token_s, timeouts.between_tokens_s, request.max_tokens)
    until = min(started + budget, timeouts.deadline)
    try:
        answer = post_json(
            base_url + path,
            payload,
            connect_timeout_s=max(0.001, min(2.0, until - started)),
            until=until,
            cancelled=cancelled,
            deadline=timeouts.deadline,
            stalled=stalled,
        )
    except PlainCancelled as cancel:
        raise Cancelled() from cancel
    except PlainFailure as failure:
        raise BackendError(failure.outcome, f"{spec.name}: {failure}", retryable=failure.retryable) from failure
    finished_at = time.monotonic()
    body = answer.body.decode("utf-8", errors="replace")
    if answer.status != 200:
        raise _status_error(answer.status, body[:500])
    try:
        data = json.loads(body)
        choice = data["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        # mlx_lm.server answers in HTTP/1.0 without a length: a server killed mid-answer looks like
        # a short body. Only a whole JSON answer with a finish_reason is a result.
        raise BackendError(
            AttemptOutcome.CONNECTION_ERROR, f"{spec.name} sent an incomplete answer: {body[:200]!r}", retryable=True
        ) from error
    text = _choice_text(choice)
    usage = data.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens") or 0)
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return Completion(
        text=text,
        finish_reason="stop" if choice.get("finish_reason") == "stop" else "length",
        prompt_tokens=prompt_tokens,
        completion_tokens=min(completion_tokens, request.max_tokens),
        first_token_at=None,
        finished_at=finished_at,
        cached_tokens=cached_prompt_tokens(usage, data.get("timings") or {}, prompt_tokens),
    )


def cached_prompt_tokens(usage: dict[str, Any], timings: dict[str, Any], prompt_tokens: int) -> int:
    """The prompt tokens a server took from its prompt cache, wherever it says so:
    - `usage.prompt_tokens_details.cached_tokens` (OpenAI's field): mlx_lm.server 0.32 (plain, and
      in the streamed usage chunk), and llama-server as built here from llama-cpp-python 0.3.36's
      sources (on its OpenAI endpoints, plain and in the last streamed chunk); 0 on a miss;
    - `timings.cache_n`: llama-server's own count of the same, in every answer's `timings`, for
      builds that have it without the OpenAI field;
    - never llama-server's `tokens_cached` (its native /completion only): the tokens held in the
      slot after the answer, generated ones included, not what this prompt reused;
    - llama_cpp.server reuses its one context's common prefix but reports none of it: 0.
    Capped by the prompt, so a ratio over prompt tokens stays a ratio."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = timings.get("cache_n")
    try:
        count = int(cached or 0)
    except (TypeError, ValueError):
        return 0
    return max(0, min(count, prompt_tokens)) if prompt_tokens else max(0, count)


def _empty_stream(
    client: httpx.Client, url: str, payload: dict[str, Any], spec: ServerSpec, timeout: httpx.Timeout
) -> BackendError:
    """A stream that closed before saying anything: find out why where the server hides it."""
    if spec.hides_errors_in_streams:
        probe = {**payload, "stream": False, "max_tokens": 1}
        probe.pop("stream_options", None)
        for attempt in range(2):  # it drops the kept-alive connection after such a stream: retry on a new one
            try:
                response = client.post(url, json=probe, timeout=timeout)
            except httpx.TransportError as error:
                if attempt == 0:
                    continue
                return BackendError(AttemptOutcome.CONNECTION_ERROR, f"{spec.name}: {error!r}", retryable=True)
            if response.status_code != 200:
                return _http_error(response)
            break
    return BackendError(AttemptOutcome.SERVER_ERROR, f"{spec.name} closed the stream without a token", retryable=True)


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events: `data: {...}` lines; comments (mlx's `: keepalive`) and blanks skipped."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def _choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice.get("text") or "")
    delta = choice.get("delta") or choice.get("message") or {}
    return str(delta.get("content") or "")


def _http_error(response: httpx.Response) -> BackendError:
    return _status_error(response.status_code, response.text[:500])


def _status_error(status: int, body: str) -> BackendError:
    if status == 429 or status >= 500 or (status == 404 and "generation thread died" in body):
        return BackendError(AttemptOutcome.SERVER_ERROR, f"server answered {status}: {body}", retryable=True)
    return BackendError(AttemptOutcome.INVALID, f"server refused the request ({status}): {body}", retryable=False)
