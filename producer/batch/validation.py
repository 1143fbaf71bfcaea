"""A batch file checked before anything is queued: every line, the content's digest, unique custom_ids."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jobcontract.admission import ModelTooLarge
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
    # Each model the valid lines ask for, and its first line: what the live workers must be able to hold.
    first_line_of_model: dict[str, int] = field(default_factory=dict)

    def refuse_too_large(self, check: Callable[[Iterable[str]], None]) -> None:
        """Run admission's model-size check (JobStore.check_sizes) on every model of the file before a
        line is queued: a model no live worker can hold fails the batch now, naming its first line,
        not half way through it. Raises BatchModelTooLarge."""
        try:
            check(self.first_line_of_model)
        except ModelTooLarge as refused:
            raise BatchModelTooLarge(refused, self.first_line_of_model[refused.model]) from refused


class BatchModelTooLarge(ValueError):
    """A line asks for a model no live worker's memory budget can hold: nothing was queued."""

    def __init__(self, refused: ModelTooLarge, line: int) -> None:
        super().__init__(f"line {line}: {refused}; nothing was queued")
        self.refused = refused
        self.line = line


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
            result.first_line_of_model.setdefault(parsed.request.model, parsed.number)
            continue
        result.invalid += 1
        if len(result.errors) < SHOWN_ERRORS:
            result.errors.append(parsed)
    result.digest = digest.hexdigest()
    return result
