"""Starting worker processes, light enough for `genq worker` to do before it imports a Redis client.

A worker is ready when its server is: its start is the server's load plus whatever delays the
server's launch. This module imports the standard library, the worker settings and the server specs,
no Redis client and no dramatiq (a third of a second here), so `genq worker` spawns its processes
first, each starting its server first thing (workers.boot), and imports the rest of the supervisor
(workers.supervisor) while the models load (issue #12).

A process may so start before its supervisor has vouched for it in Redis. It reads no queue until
that vouch (`Child.vouched`): no janitor may take it for dead while it holds jobs.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as ProcessEvent

from workers import prelaunch
from workers.prelaunch import Spawned
from workers.servers import specs
from workers.servers.supervisor import Launch
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class Child:
    name: str
    process: SpawnProcess
    ready: ProcessEvent  # set by the process once it serves
    vouched: ProcessEvent  # set by the supervisor once Redis holds its liveness key
    started: float = field(default_factory=time.monotonic)
    joined: bool = False  # vouched for as ready: in its pool


class Spawner:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.models = settings.served_models()
        self._context = multiprocessing.get_context("spawn")
        self.metrics_dir = self._metrics_dir()

    def spawn(self) -> Child:
        """A new worker process, started; it waits for `vouched` before it reads a queue."""
        return self._configure(prelaunch.spawn(self._context, self.launch))

    def adopt(self, early: list[Spawned]) -> list[Child]:
        """Processes spawned before the settings were read (workers.prelaunch): those whose launch is
        the one the settings make become children; the others are stopped and spawned again."""
        children = []
        for spawned in early:
            if spawned.launch == self.launch:
                children.append(self._configure(spawned))
            else:
                log.info("the settings launch another server than the last run did: starting it")
                spawned.abort()
                children.append(self.spawn())
        return children

    def _configure(self, spawned: Spawned) -> Child:
        label = self.models[0] if not self.settings.multi_model else "models"
        name = f"{self.settings.host}:{label}.{self.settings.backend.value}:{uuid.uuid4().hex[:8]}"
        spawned.configure(self.settings.model_dump_json(), name)
        return Child(name=name, process=spawned.process, ready=spawned.ready, vouched=spawned.vouched)

    @functools.cached_property
    def launch(self) -> Launch | None:
        return self._launch()

    def _launch(self) -> Launch | None:
        """The server's command for a new single-model worker process to start first thing
        (workers.boot); None for a multi-model worker, which starts its servers on demand (no model
        is loaded before a job needs it), and when it cannot be made here (a missing binary): the
        worker process then fails and says why."""
        if self.settings.multi_model:
            return None
        try:
            model = self.models[0]
            return specs.for_model(self.settings, model).launch(specs.log_path(self.settings, model))
        except Exception as error:
            log.warning("the server's command could not be prepared (%s); the worker process will try", error)
            return None

    def _metrics_dir(self) -> str | None:
        """With a metrics port, the folder every worker process writes its metrics to (prometheus-client's
        multiprocess mode), named in their environment before the first is spawned. Always a fresh
        one (inside the given one, if any): files left by an earlier run would be summed into this
        one's counters; the supervisor deletes it when it stops."""
        if self.settings.metrics_port is None:
            return None
        directory = tempfile.mkdtemp(prefix="genq-metrics-", dir=os.environ.get(PROMETHEUS_DIR_VARIABLE))
        os.environ[PROMETHEUS_DIR_VARIABLE] = directory
        return directory
