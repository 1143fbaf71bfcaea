"""Where a batch's output and error lines go, each commit together with the runner's checkpoint.

The checkpoint says how far the runner read the batch's stream of finished jobs and how long the
output and error files were when it said so. A runner that crashes mid-write resumes from the last
checkpoint: the files are cut back to the lengths it recorded and the same lines are written again,
so each custom_id ends up in the output exactly once without remembering every id.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import redis

from jobcontract.keys import Keys


@dataclass
class Counts:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    invalid: int = 0
    tokens: int = 0

    @property
    def written(self) -> int:
        """Finished jobs written out, to either file (invalid lines never became jobs)."""
        return self.completed + self.failed + self.cancelled


@dataclass
class Checkpoint:
    cursor: str = "0-0"  # last entry of the batch's done stream that is written out
    invalid_through: int = 0  # input line number up to which invalid lines are written out
    counts: Counts = field(default_factory=Counts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        data = json.loads(text)
        return cls(cursor=data["cursor"], invalid_through=data["invalid_through"], counts=Counts(**data["counts"]))


class Sink(Protocol):
    checkpoint: Checkpoint

    def commit(self, output: list[str], errors: list[str], checkpoint: Checkpoint) -> None: ...

    def close(self) -> None: ...


class OutputConflict(Exception):
    """The output file is not one this batch can resume into."""


class FileSink:
    """Output and error JSONL files, and a small checkpoint file beside the output."""

    def __init__(self, batch_id: str, output: Path, errors: Path) -> None:
        self.batch_id = batch_id
        self.output_path = output
        self.errors_path = errors
        self.checkpoint_path = output.with_name(output.name + ".genq-checkpoint")
        self.checkpoint, sizes = self._load()
        self.output = _open_at(output, sizes[0])
        self.errors = _open_at(errors, sizes[1])

    def _load(self) -> tuple[Checkpoint, tuple[int, int]]:
        if not self.checkpoint_path.exists() or not self.output_path.exists():
            if self.output_path.exists() and self.output_path.stat().st_size > 0:
                raise OutputConflict(
                    f"{self.output_path} exists and was not written by genq batch run; "
                    "move it away or choose another output"
                )
            return Checkpoint(), (0, 0)
        saved = json.loads(self.checkpoint_path.read_text())
        if saved["batch_id"] != self.batch_id:
            raise OutputConflict(
                f"{self.output_path} holds the output of batch {saved['batch_id']}, not {self.batch_id} "
                "(the input changed?); choose another output"
            )
        sizes = (int(saved["output_bytes"]), int(saved["errors_bytes"]))
        for path, size in ((self.output_path, sizes[0]), (self.errors_path, sizes[1])):
            if size and (not path.exists() or path.stat().st_size < size):
                raise OutputConflict(
                    f"{path} is shorter than genq wrote it; remove {self.checkpoint_path} to start over"
                )
        return Checkpoint.from_json(saved["checkpoint"]), sizes

    def commit(self, output: list[str], errors: list[str], checkpoint: Checkpoint) -> None:
        for handle, lines in ((self.output, output), (self.errors, errors)):
            if lines:
                handle.write("".join(lines).encode())
                handle.flush()
                os.fsync(handle.fileno())
        state = {
            "batch_id": self.batch_id,
            "output_bytes": self.output.tell(),
            "errors_bytes": self.errors.tell(),
            "checkpoint": checkpoint.to_json(),
        }
        temporary = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.checkpoint_path)
        self.checkpoint = checkpoint

    def close(self) -> None:
        self.output.close()
        self.errors.close()


def _open_at(path: Path, size: int) -> BinaryIO:
    """Open for appending after cutting off whatever was written past the last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("r+b" if path.exists() else "w+b")
    handle.truncate(size)
    handle.seek(size)
    return handle


class RedisSink:
    """Output and error files stored in Redis (the gateway's /v1/files), appended in the same
    transaction that moves the checkpoint, so a crash can never write a line twice."""

    def __init__(
        self, client: redis.Redis, keys: Keys, batch_id: str, output_file_id: str, error_file_id: str, ttl_s: int
    ) -> None:
        self.client = client
        self.batch_key = keys.batch(batch_id)
        self.output_key = keys.file_content(output_file_id)
        self.errors_key = keys.file_content(error_file_id)
        self.ttl_s = ttl_s
        raw = client.hget(self.batch_key, "checkpoint")
        self.checkpoint = Checkpoint() if raw is None else Checkpoint.from_json(_text(raw))

    def commit(self, output: list[str], errors: list[str], checkpoint: Checkpoint) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key, lines in ((self.output_key, output), (self.errors_key, errors)):
            if lines:
                pipe.append(key, "".join(lines))
                pipe.expire(key, self.ttl_s)
        pipe.hset(self.batch_key, "checkpoint", checkpoint.to_json())
        pipe.execute()
        self.checkpoint = checkpoint

    def close(self) -> None:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
