"""A batch as OpenAI shows it: the Batch object every /v1/batches answer returns, and the ids of its
output and error files."""

from __future__ import annotations

from typing import Any

from producer.batch.book import BatchRecord
from producer.openai_format import COMPLETIONS_URL


def batch_object(record: BatchRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint or COMPLETIONS_URL,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input,
        "completion_window": record.completion_window,
        "status": record.status.value,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.created_at + 24 * 3600,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": None,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed + record.cancelled,
        },
        "metadata": record.metadata,
    }


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-errors"
