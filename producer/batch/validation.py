"""A batch file checked before anything is queued: every line, the content's digest, unique custom_ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from jobcontract.limits import Limits
from producer.batch.lines import BatchLine, InvalidLine, checked_lines
from producer.batch.sources import LineSource

SHOWN_ERRORS = 20


@dataclass
class Validation:
    valid: int = 0
    invalid: int = 0
    errors: list[InvalidLine] = field(default_factory=list)  # the first few, for the report
    digest: str = ""


class BatchInvalid(ValueError):
    """Some lines are invalid and the caller did not ask to skip them: nothing was queued."""

    def __init__(self, validation: Validation) -> None:
        shown = "\n".join(f"  {e}" for e in validation.errors)
        more = validation.invalid - len(validation.errors)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{validation.invalid} invalid line(s); nothing was queued (--skip-invalid queues the rest):\n{shown}{tail}"
        )
        self.validation = validation


def validate(source: LineSource, limits: Limits, *, endpoint: str | None = None) -> Validation:
    """One streaming pass over the input: every line checked, the content hashed, custom_ids unique."""
    result = Validation()
    digest = hashlib.sha256()
    for _number, raw, parsed in checked_lines(source, limits, endpoint=endpoint):
        digest.update(raw if raw.endswith(b"\n") else raw + b"\n")
        if parsed is None:
            continue
        if isinstance(parsed, BatchLine):
            result.valid += 1
            continue
        result.invalid += 1
        if len(result.errors) < SHOWN_ERRORS:
            result.errors.append(parsed)
    result.digest = digest.hexdigest()
    return result
