"""One line of an OpenAI Batch input file in, one line of its output (or error) file out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobcontract.limits import Limits
from jobcontract.models import GenerationRequest, GenerationResult, Lane
from producer.batch.sources import LineSource
from producer.openai_format import (
    CHAT_URL,
    Endpoint,
    failure,
    parse_body,
    response_body,
    to_request,
    validation_message,
)

# Where a job of a batch keeps the two things its output line needs, in its own metadata.
CUSTOM_ID = "genq.custom_id"
ENDPOINT = "genq.endpoint"
MAX_CUSTOM_ID = 200  # leaves room for the batch id inside a 256-character idempotency key


class InputLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID)
    method: str = "POST"
    url: Endpoint
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchLine:
    number: int  # 1-based, as an editor shows it
    custom_id: str
    endpoint: str
    request: GenerationRequest

    def for_batch(self, batch_id: str) -> tuple[str, GenerationRequest]:
        """This line's job id and request inside one batch: both fixed by (batch, custom_id), so a
        rerun of the batch resubmits the same job and the store answers with the first one."""
        return job_id_for(batch_id, self.custom_id), self.request.model_copy(
            update={"idempotency_key": f"{batch_id}:{self.custom_id}"}
        )


@dataclass(frozen=True)
class InvalidLine:
    number: int
    custom_id: str | None
    message: str

    def __str__(self) -> str:
        return f"line {self.number}: {self.message}"


def job_id_for(batch_id: str, custom_id: str) -> str:
    return hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:32]


def parse_line(
    number: int, raw: bytes | str, limits: Limits, *, endpoint: str | None = None
) -> BatchLine | InvalidLine | None:
    """A valid line, the reason it is not, or None for a blank line."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return InvalidLine(number, None, f"not valid JSON ({error.msg} at column {error.colno})")
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    try:
        line = InputLine.model_validate(data)
    except ValidationError as error:
        return InvalidLine(number, custom_id, validation_message(error)[0])
    if line.method.upper() != "POST":
        return InvalidLine(number, custom_id, f"method must be POST, not {line.method!r}")
    if endpoint is not None and line.url != endpoint:
        return InvalidLine(number, custom_id, f"url {line.url!r} differs from the batch's endpoint {endpoint!r}")
    try:
        body = parse_body(line.url, line.body)
        if body.stream:
            return InvalidLine(number, custom_id, "body.stream: batch lines cannot stream")
        if body.model not in limits.models:
            known = ", ".join(sorted(limits.models)) or "none configured"
            return InvalidLine(number, custom_id, f"body.model: unknown model {body.model!r}; known models: {known}")
        fields = to_request(body, lane=Lane.BATCH, metadata={CUSTOM_ID: line.custom_id, ENDPOINT: line.url})
        request = limits.cap(GenerationRequest.model_validate(fields, context={"limits": limits}))
    except ValidationError as error:
        return InvalidLine(number, custom_id, f"body: {validation_message(error)[0]}")
    return BatchLine(number, line.custom_id, line.url, request)


def checked_lines(
    source: LineSource, limits: Limits, *, endpoint: str | None = None
) -> Iterator[tuple[int, bytes, BatchLine | InvalidLine | None]]:
    """Every line of the source with what it is: valid, invalid and why, or None when blank. A
    custom_id already taken by an earlier valid line makes a line invalid. Validation and the runner
    both read lines through here, so they agree on which lines become jobs: a repeated custom_id
    names the first line's job, and a runner that queued it again once counted it in flight forever."""
    seen: set[int] = set()  # 8-byte hashes of custom_ids: a few MB for 100k lines, never the lines
    for number, raw in source():
        parsed = parse_line(number, raw, limits, endpoint=endpoint)
        if isinstance(parsed, BatchLine):
            key = int.from_bytes(hashlib.blake2b(parsed.custom_id.encode(), digest_size=8).digest())
            if key in seen:
                parsed = InvalidLine(number, parsed.custom_id, f"custom_id {parsed.custom_id!r} appears more than once")
            else:
                seen.add(key)
        yield number, raw, parsed


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n"


def output_line(job_id: str, result: GenerationResult | None, *, custom_id: str | None = None) -> tuple[bool, str]:
    """(is an error, the JSONL line) for a finished job, in OpenAI's batch output format; `custom_id`
    names the line when the result does not (a job cancelled before it ran, an expired result)."""
    line: dict[str, Any]
    if result is None:
        line = {
            "id": f"batch_req_{job_id}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": "result_expired", "message": f"the result of job {job_id} expired before it was written"},
        }
        return True, _dump(line)
    custom_id = result.metadata.get(CUSTOM_ID, custom_id)
    endpoint = result.metadata.get(ENDPOINT, CHAT_URL)
    if result.ok:
        body = response_body(endpoint, result)
        line = {
            "id": f"batch_req_{job_id}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job_id, "body": body},
            "error": None,
        }
        return False, _dump(line)
    status, error = failure(result)
    line = {
        "id": f"batch_req_{job_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": job_id, "body": error},
        "error": {"code": error["error"]["code"], "message": error["error"]["message"]},
    }
    return True, _dump(line)


def invalid_line(invalid: InvalidLine) -> str:
    return _dump(
        {
            "id": f"batch_req_line_{invalid.number}",
            "custom_id": invalid.custom_id,
            "response": None,
            "error": {"code": "invalid_request", "message": str(invalid), "line": invalid.number},
        }
    )
