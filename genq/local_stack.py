"""genq on one machine, for `genq demo`, the benchmarks (bench/) and the tests (tests/harness.py):
a private `redis-server`, the tiny model, and real `genq worker` processes started and stopped for
sure (genq/processes.py: they die with their starter, even when it is SIGKILLed).

The worker handle is genq/local_worker.py and the one rule for a worker's environment (no `GENQ_`
variable of the calling shell, the settings object written out) is genq/worker_env.py; this module
only ties them to a Redis and a scratch folder and stops everything, in reverse order, on close.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from genq.local_redis import LocalRedis
from genq.local_worker import Worker, start_worker
from genq.tiny_model import ensure_tiny_model
from jobcontract.settings import GenqSettings


class LocalStack:
    """A private redis-server (unless given a Redis URL), the tiny model, a scratch folder, and
    every worker started through it, all stopped when it closes (in reverse order), whether the
    block ended well or not."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        models_dir: Path | None = None,
        run_dir: Path | None = None,
        redis_appendonly: bool = False,
    ) -> None:
        self._given_url = redis_url
        self._appendonly = redis_appendonly
        self.models_dir = (models_dir or GenqSettings().models_dir).expanduser()
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="genq-stack-"))
        self.redis: LocalRedis | None = None
        self.workers: list[Worker] = []
        self.exits = ExitStack()
        self.mlx_model, self.gguf_model = ensure_tiny_model(self.models_dir)

    def __enter__(self) -> Self:
        try:
            if self._given_url is None:
                self.redis = self.exits.enter_context(LocalRedis(appendonly=self._appendonly))
        except BaseException:
            self.exits.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.exits.close()

    @property
    def url(self) -> str:
        if self._given_url is not None:
            return self._given_url
        assert self.redis is not None, "enter the stack first"
        return self.redis.url

    def settings(self, **fields: object) -> GenqSettings:
        """Settings on this stack's Redis and models; `fields` override (namespace, routes_file, ...)."""
        base = GenqSettings(redis_url=self.url, models_dir=self.models_dir)
        return base.model_copy(update=fields)

    def start_worker(self, settings: GenqSettings, **options: Any) -> Worker:
        """`start_worker` with this stack's scratch folder; stopped when the stack closes."""
        worker = start_worker(settings, self.run_dir, **options)
        self.workers.append(worker)
        self.exits.callback(self._stop, worker)
        return worker

    def stop_worker(self, worker: Worker) -> None:
        self._stop(worker)

    def _stop(self, worker: Worker) -> None:
        worker.stop()
        if worker in self.workers:
            self.workers.remove(worker)
