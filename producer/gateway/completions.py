"""`POST /v1/completions`, `POST /v1/chat/completions` and `GET /v1/models`, through the queue.

A request becomes a job on the interactive lane (ahead of batch work), so a caller gets the
queue's retries, reroutes and metrics. With `stream: true` the answer is server-sent events fed
from the job's token stream as the worker produces it; a caller who hangs up cancels the job, unless
the request carried an Idempotency-Key.

Why an idempotent stream is not cancelled by a hang-up: the key says "I will retry this", and a retry
is answered by the same job. Cancelling it would leave the key pointing at a cancelled job for the
key's whole TTL (24 h), so every retry would replay a few tokens and end "cancelled"; releasing the
key instead would race a retry that is already on its way. So the job runs on (its deadline and
max_tokens still bound it), and a retry streams it again from its first token, out of the job's
event stream, to the end: the whole output. A retry whose job did end without success (cancelled
through /v1/genq/jobs, failed, timed out) gets a clear 409 at once, never a partial replay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, StreamingResponse

from jobcontract.models import GenerationRequest, JobState, Lane
from jobcontract.protocol.operation import run_async
from jobcontract.protocol.placement import ReadModels
from producer.gateway.api_keys import Caller
from producer.gateway.draining import ShuttingDown
from producer.gateway.errors import ApiError
from producer.gateway.security import CallerDep
from producer.gateway.services import Services, services
from producer.openai_format import (
    CHAT_URL,
    COMPLETIONS_URL,
    Body,
    ChatBody,
    CompletionBody,
    chunk,
    error_body,
    failure,
    now_s,
    response_body,
    to_request,
    usage_chunk,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)]


@router.post(COMPLETIONS_URL, summary="Create a completion (OpenAI-compatible)")
async def completions(
    body: CompletionBody,
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await _complete(COMPLETIONS_URL, body, s, caller, idempotency_key)


@router.post(CHAT_URL, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(
    body: ChatBody,
    s: Annotated[Services, Depends(services)],
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await _complete(CHAT_URL, body, s, caller, idempotency_key)


@router.get("/v1/models", summary="The models in the routes (OpenAI-compatible)")
async def models(s: Annotated[Services, Depends(services)]) -> dict[str, Any]:
    """Each model with, beside OpenAI's fields, the live workers that hold it loaded (`loaded_on`) and
    those that may load it on demand (`served_by`), as the workers publish them."""
    created = now_s()
    fleet = await run_async(s.store.client, ReadModels(s.store.keys))
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": created,
            "owned_by": "genq",
            "backends": [b.value for b in m.order],
            "loaded_on": [w.worker for w in fleet if m.name in w.loaded],
            "served_by": [w.worker for w in fleet if m.name in w.serves],
        }
        for m in s.settings.routes.models
    ]
    return {"object": "list", "data": data}


async def _complete(endpoint: str, body: Body, s: Services, caller: Caller, idempotency_key: str | None) -> Any:
    request = s.check(to_request(body, lane=Lane.INTERACTIVE, idempotency_key=idempotency_key))
    job_id, duplicate = await s.submit(request, caller)
    if not body.stream:
        result = await s.drain.race(s.store.wait(job_id, s.wait_s(request)), job_id=job_id)
        if not result.ok:
            status, error = failure(result)
            return JSONResponse(error, status_code=status)
        return response_body(endpoint, result)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    if duplicate:
        await _replayable(job_id, s)
    return StreamingResponse(
        _events(endpoint, job_id, request, s, include_usage=include_usage, keep=idempotency_key is not None),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Genq-Job-Id": job_id},
    )


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _replayable(job_id: str, s: Services) -> None:
    """A retried stream replays its job from the first token; one whose job ended without success
    would replay part of an answer and then an error: refuse it clearly instead."""
    found = await s.store.result(job_id)
    if found is not None and found.state is not JobState.SUCCEEDED:
        raise ApiError(
            409,
            f"the earlier request with this Idempotency-Key (job {job_id}) was {found.state.value}, so there is "
            "no whole output to replay; send the request again with a new Idempotency-Key",
            code="idempotency_key_job_ended",
        )


async def _events(
    endpoint: str, job_id: str, request: GenerationRequest, s: Services, *, include_usage: bool, keep: bool
) -> AsyncIterator[str]:
    """The job's tokens as SSE. `keep`: the request is idempotent, so a hang-up leaves the job running
    for a retry (see the module doc); otherwise a hang-up cancels it."""
    created, model = now_s(), request.model
    finished = False
    try:
        if endpoint == CHAT_URL:
            yield _sse(chunk(endpoint, job_id, model, created, text="", role=True))
        tokens = s.store.tokens(job_id, s.wait_s(request))  # each index once, across retries
        async for token in s.drain.iterate(tokens, job_id=job_id):
            yield _sse(chunk(endpoint, job_id, model, created, text=token.text))
        result = await s.store.result(job_id)
        finished = True
        if result is None or not result.ok:
            message = "the job's result expired" if result is None else failure(result)[1]["error"]["message"]
            yield _sse(error_body(message, "server_error", code="generation_failed"))
        else:
            reason = result.finish_reason if result.finish_reason in ("stop", "length") else "stop"
            yield _sse(chunk(endpoint, job_id, model, created, finish_reason=reason))
            if include_usage:
                yield _sse(usage_chunk(endpoint, result, created))
        yield "data: [DONE]\n\n"
    except ShuttingDown as stopping:  # the gateway is stopping: say so, then cancel below as on a hang-up
        yield _sse(stopping.body)
    finally:
        if not finished and not keep:  # the caller hung up (or the wait timed out): free the worker's slot
            with anyio.CancelScope(shield=True):
                try:
                    await s.store.cancel(job_id)
                except Exception as error:  # the caller is gone either way; the job's deadline still holds
                    log.warning("could not cancel abandoned job %s: %s", job_id, error)
