"""The models of a multi-model worker process: one server per loaded model, loaded on demand.

Why one server per model, not one server that swaps: mlx_lm.server (like llama-server) loads one
model per process, given at start. Unloading is stopping that process, which gives its memory back
to the OS at once and for sure (no allocator caches or Metal heaps left behind), and a crash or an
out-of-memory kill takes one model down, not the others. The cost is a process start per load,
small beside reading the weights.

The decisions (what to load, unload and drain, and why) are workers.models.plan.plan(), a pure
function; this module only carries them out from one thread, so loads happen one at a time (memory
is freed before it is taken, and a load is measured before the next is planned), and feeds the
next plan what happened: how many jobs wait for and generate on each model (the jobs the process's
consumers hold, and the lease each attempt holds, ModelHandle.using), the servers' measured memory,
and which server died.

A job held for a model that is not loaded waits in its consumer, not on a worker thread
(`runnable()` is the consumer's gate, jobcontract.broker): a thread blocked on a load is a thread
the loaded models' jobs cannot have, and a loaded model whose jobs find no thread looks idle, is
swapped out, and is wanted again at once (the models then load in strict rotation).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from workers.metrics import ModelMetrics
from workers.models.plan import Drain, Load, ModelState, TooLarge, Unload, UnloadReason, plan
from workers.models.sizes import ModelSizes, resident_bytes
from workers.servers.specs import ServerSpec
from workers.servers.supervisor import ServerFailed, ServerSupervisor

log = logging.getLogger(__name__)

TEND_EVERY_S = 0.25


class ModelHandle:
    """What a JobRunner sees as its server for one model: the model's server while it is loaded, and
    a request to load it when a job needs it (the job then waits for the load within its deadline).

    Each attempt runs inside `using()`: waiting first (for a load, or for a drain to end), then, once
    `wait_ready` lets it through, generating. The manager never unloads a model with a job
    generating, and plans from both counts (see workers.models.plan)."""

    def __init__(self, models: ModelSet, model: str, spec: ServerSpec, load_wait_s: float) -> None:
        self.models = models
        self.model = model
        self.spec = spec
        self._load_wait_s = load_wait_s
        self._phase = threading.local()  # this job thread's: "waiting" or "generating"

    @property
    def load_wait_s(self) -> float:
        """How long a job may wait for a load (the server start timeout); none for a model this worker
        refused (over its whole budget): its jobs fail over at once instead of waiting in vain."""
        return 0.0 if self.models.refused(self.model) else self._load_wait_s

    def _server(self) -> ServerSupervisor | None:
        return self.models.server(self.model)

    @property
    def base_url(self) -> str:
        server = self._server()
        return server.base_url if server is not None else "http://127.0.0.1:1"

    @property
    def pid(self) -> int | None:
        server = self._server()
        return None if server is None else server.pid

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        self._phase.value = "waiting"
        self.models.enter(self.model)
        with contextlib.ExitStack() as server_lease:
            self._phase.lease = server_lease
            try:
                yield
            finally:
                self.models.leave(self.model, generating=self._phase.value == "generating")
                self._phase.value = self._phase.lease = None

    def wait_ready(self, timeout_s: float) -> bool:
        if getattr(self._phase, "value", None) == "generating":  # asked again within one attempt
            server = self._server()
            return server is not None and server.wait_ready(timeout_s)
        if self.models.acquire(self.model, timeout_s):
            self._phase.value = "generating"
            # Generating, the job holds the model's server too (ServerSupervisor.using): it is probed
            # at the busy cadence, and its silence is counted from now, until the attempt ends.
            server = self._server()
            lease = getattr(self._phase, "lease", None)
            if server is not None and lease is not None:
                lease.enter_context(server.using())
            return True
        return False

    def died_since(self, pid: int | None) -> bool:
        server = self._server()
        return True if server is None else server.died_since(pid)

    def silent_s(self) -> float:
        server = self._server()
        return 0.0 if server is None else server.silent_s()


class ModelSet:
    """Loads, unloads and watches the servers of one process's models (see the module docstring)."""

    def __init__(
        self,
        *,
        specs: Mapping[str, ServerSpec],
        sizes: ModelSizes,
        budget_bytes: int,
        keep_alive_s: float,
        make_server: Callable[[str, Callable[[str], None]], ServerSupervisor],
        metrics: ModelMetrics,
        load_wait_s: float,
    ) -> None:
        self.specs = dict(specs)
        self.sizes = sizes
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self._make_server = make_server
        self.metrics = metrics
        self.handles = {m: ModelHandle(self, m, spec, load_wait_s) for m, spec in self.specs.items()}
        self._servers: dict[str, ServerSupervisor] = {}  # loaded, or loading
        self._ready: dict[str, threading.Event] = {m: threading.Event() for m in self.specs}
        self._last_used: dict[str, float] = dict.fromkeys(self.specs, 0.0)
        self._load_s: dict[str, float] = {}  # how long each model's last load took: what unloading it may cost
        self._waiting: dict[str, int] = dict.fromkeys(self.specs, 0)
        self._generating: dict[str, int] = dict.fromkeys(self.specs, 0)
        self._waiting_since: dict[str, float] = {}
        self._held: Callable[[], Mapping[str, int]] = dict  # model -> jobs the process's consumers hold
        self._changed: Callable[[], None] = lambda: None  # what loaded() answers changed
        self._draining: set[str] = set()
        self._crashed: set[str] = set()  # its server died: unload it, load it again alone
        self._died_loading: set[str] = set()
        self._refused: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}  # a failed load is not tried again before this instant
        self._load_failures: dict[str, int] = {}
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="models", daemon=True)
        metrics.set_budget(budget_bytes)
        for model in self.specs:
            metrics.create_series(model)

    def watch_held(self, held: Callable[[], Mapping[str, int]]) -> None:
        """Where to read how many jobs of each model the process holds (taken, not settled): those not
        on a thread yet wait for the model as much as those that are."""
        self._held = held

    def when_changed(self, poke: Callable[[], None]) -> None:
        """Whom to tell that what `loaded` answers changed (the worker's models publisher). A server's
        own state changes come too early for it: "ready" is told before its load counts here."""
        self._changed = poke

    def _waiting_now(self, model: str, held: Mapping[str, int]) -> int:
        """Jobs waiting for the model: held and not generating (under the lock). A job between its end
        and its ack counts for a moment: the model then looks wanted a little longer, never idle early."""
        return max(self._waiting[model], held.get(model, 0) - self._generating[model])

    # -- what jobs call ---------------------------------------------------------------------------------
    def server(self, model: str) -> ServerSupervisor | None:
        with self._lock:
            return self._servers.get(model)

    def enter(self, model: str) -> None:
        """A job starts waiting to use the model."""
        with self._lock:
            self._waiting[model] += 1
            self._waiting_since.setdefault(model, time.monotonic())
        self._wake.set()

    def leave(self, model: str, *, generating: bool) -> None:
        """A job's attempt is over, after generating on the model or while still waiting for it."""
        with self._lock:
            if generating:
                self._generating[model] -= 1
            else:
                self._waiting[model] -= 1
            self._last_used[model] = time.monotonic()
        self._wake.set()

    def acquire(self, model: str, timeout_s: float) -> bool:
        """Let a waiting job generate on the model once it is loaded, waiting up to `timeout_s` for
        that; the job then counts as generating until it leaves. A drained model still runs the jobs
        the process holds for it (its queue gives it no more): they are few, and unloading it under
        them would only have them want it again."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._lock:
                if model in self._servers and self._ready[model].is_set():
                    self._waiting[model] -= 1
                    self._generating[model] += 1
                    self._last_used[model] = time.monotonic()
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ready[model].wait(min(left, 0.25))  # unloaded and loaded again meanwhile: look again

    def refused(self, model: str) -> str | None:
        return self._refused.get(model)

    def runnable(self, model: str) -> bool:
        """Whether a held job of the model may have a worker thread (the consumer's gate): its model is
        loaded; or it was refused, or its last load failed, so the job fails over (or waits for the
        retried load within its load wait) as it would on any worker, rather than wait unseen."""
        with self._lock:
            loaded = model in self._servers and self._ready[model].is_set()
            return loaded or model in self._refused or model in self._load_failures

    # -- what the worker process reads ------------------------------------------------------------------
    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(m for m in self._servers if self._ready[m].is_set())

    def draining(self, model: str) -> bool:
        """Whether the model is being drained for a swap: its queue takes nothing new meanwhile."""
        with self._lock:
            return model in self._draining

    def would_swap(self, model: str, also: Iterable[str] = ()) -> bool:
        """Whether loading `model` now would have to unload another: it does not fit beside the models
        loaded or loading, and `also` (models the worker has taken jobs for, to be loaded next). Beside
        a model whose size is not known yet (no server measured: see ModelSizes.known), it may not:
        the worker then commits to one model until its load is measured."""
        with self._lock:
            if model in self._servers:
                return False
            held = set(self._servers) | set(also)
        held.discard(model)
        if held and not all(self.sizes.known(m) for m in (*held, model)):
            return True
        return sum(self.sizes.size(m) for m in held) + self.sizes.size(model) > self.budget_bytes

    def swap_wait(self, model: str, also: Iterable[str] = ()) -> float | None:
        """What making room for `model` would cost the models loaded here: None when it would unload a
        model with work (jobs held, waiting or generating); else how long a job for `model` should have
        waited before it does: an idle model in the way is unloaded for a job once the model's idle
        time and the job's wait add up to the model's last load (the ski-rental rule: a model whose
        jobs keep coming within its load time is not swapped out for a newcomer's first job, while a
        backlog that waited that long, a batch's, swaps as soon as the model in its way has run out
        of jobs). Idle models go least recently used first, as the plan unloads them. `also` are
        models the worker holds jobs for."""
        held = self._held()
        now = time.monotonic()
        with self._lock:
            if model in self._servers:
                return 0.0
            idle = sorted(
                (
                    m
                    for m in self._servers
                    if self._ready[m].is_set() and not self._generating[m] and not self._waiting_now(m, held)
                ),
                key=lambda m: self._last_used[m],
            )
            owed = {m: max(0.0, self._load_s.get(m, 0.0) - (now - self._last_used[m])) for m in idle}
            kept = (set(self._servers) - set(idle)) | set(also)
        kept.discard(model)
        if not all(self.sizes.known(m) for m in (*kept, *idle, model)):
            return None if kept or idle else 0.0
        used = sum(self.sizes.size(m) for m in (*kept, *idle)) + self.sizes.size(model)
        wait = 0.0
        for victim in idle:
            if used <= self.budget_bytes:
                break
            used -= self.sizes.size(victim)
            wait = max(wait, owed[victim])
        return wait if used <= self.budget_bytes else None

    def since_turn(self, model: str) -> float:
        """Seconds since the model last served a job here (or since the worker started): how long
        it has gone without its turn."""
        with self._lock:
            last = max(self._last_used[model], self._started)
        return time.monotonic() - last

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self.sizes.size(m) for m in self._servers)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        with self._lock:
            servers, self._servers = dict(self._servers), {}
        for model, server in servers.items():
            self._ready[model].clear()
            server.stop()

    # -- the manager thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tend()
            except Exception:  # a bug here must not stop the worker from serving what is loaded
                log.exception("tending the models failed")
            self._wake.wait(TEND_EVERY_S)
            self._wake.clear()

    def tend(self) -> None:
        """One pass: measure, unload the crashed, plan, carry the plan out."""
        self._measure()
        for model in sorted(self._crashed):
            self._crashed.discard(model)
            self._unload(model, UnloadReason.CRASHED, force=True)
        held = self._held()
        now = time.monotonic()
        with self._lock:
            waiting = {m: self._waiting_now(m, held) for m in self.specs}
            for model, count in waiting.items():
                if count:
                    self._waiting_since.setdefault(model, now)
                else:
                    self._waiting_since.pop(model, None)
            states = {
                m: ModelState(
                    size_bytes=self.sizes.size(m),
                    loaded=m in self._servers,
                    generating=self._generating[m],
                    waiting=waiting[m] if self._retry_at.get(m, 0.0) <= now else 0,
                    last_used=self._last_used[m],
                    draining=m in self._draining,
                    waiting_since=self._waiting_since.get(m, now),
                )
                for m in self.specs
            }
        decisions = plan(models=states, budget_bytes=self.budget_bytes, keep_alive_s=self.keep_alive_s, now=now)
        drains = {d.model for d in decisions if isinstance(d, Drain)}
        with self._lock:
            if drains - self._draining:
                log.info("draining %s: a waiting job needs the memory", ", ".join(sorted(drains - self._draining)))
            self._draining = drains
        swapped = False
        for decision in decisions:
            if isinstance(decision, Unload):
                swapped |= decision.reason is UnloadReason.SWAP
                if not self._unload(decision.model, decision.reason):
                    return  # a job took it meanwhile: plan again with that known
            elif isinstance(decision, Load):
                # One load a pass: its measured size is what the next plan knows (a size from the
                # files alone may leave out most of what a server holds).
                self._load(decision.model, swap=swapped)
                self._wake.set()
                break
            elif isinstance(decision, TooLarge):
                reason = f"needs {decision.size_bytes} bytes, over this worker's budget of {decision.budget_bytes}"
                if self._refused.get(decision.model) != reason:
                    log.error("model %s %s: not loaded", decision.model, reason)
                self._refused[decision.model] = reason
        self._publish_gauges()

    def _load(self, model: str, *, swap: bool) -> None:
        self._refused.pop(model, None)
        started = time.monotonic()
        server = self._make_server(model, lambda state: self._on_state(model, state))
        with self._lock:
            self._servers[model] = server
        log.info("loading %s (%d bytes recorded, %d of %d used)", model, self.sizes.size(model), *self._usage())
        try:
            server.start()
        except ServerFailed as error:
            # Its servers are not started again on exit (start_again_on_exit): a load that died here
            # is tried again after a back-off, planned with its raised size, so alone.
            log.error("model %s failed to load: %s", model, error)
            with self._lock:
                self._servers.pop(model, None)
            server.stop()
            if model in self._died_loading:  # not a mere timeout: most likely out of memory
                self._died_loading.discard(model)
                self.sizes.raise_to(model, self.budget_bytes)
            self.metrics.failed_loads.labels(**self._labels(model)).inc()
            failures = self._load_failures[model] = self._load_failures.get(model, 0) + 1
            self._retry_at[model] = time.monotonic() + min(60.0, 2.0**failures)  # a broken model backs off
            return
        self._load_failures.pop(model, None)
        with self._lock:
            self._last_used[model] = time.monotonic()
            self._load_s[model] = self._last_used[model] - started
        self._ready[model].set()
        self._measure_one(model, server)
        self._changed()  # measured first: the record that shows it loaded shows its size too
        self.metrics.loads.labels(**self._labels(model)).inc()
        self.metrics.load_seconds.labels(**self._labels(model)).observe(time.monotonic() - started)
        if swap:
            self.metrics.swaps.inc()
        log.info("loaded %s in %.1fs (%d bytes)", model, time.monotonic() - started, self.sizes.size(model))

    def _unload(self, model: str, reason: UnloadReason, *, force: bool = False) -> bool:
        with self._lock:
            if not force and self._generating[model] > 0:
                return False
            server = self._servers.pop(model, None)
            self._ready[model].clear()
            self._draining.discard(model)
        if server is None:
            return True
        self._changed()
        log.info("unloading %s (%s)", model, reason.value)
        server.stop()
        server.on_state("stopped")
        self.metrics.unloads.labels(**self._labels(model), reason=reason.value).inc()
        return True

    def _on_state(self, model: str, state: str) -> None:
        """From a server's threads. A death is recorded and left to the manager thread: the model counts
        as the whole budget from now on (it died beside others, out of memory most likely), and is
        loaded again, alone, when its retried jobs ask for it. A death during the load is _load's."""
        if state == "exited":  # during its start (the manager thread is in _load)
            self._died_loading.add(model)
        elif state == "down":
            log.warning("the server of %s died: its recorded size is raised to the budget", model)
            self.sizes.raise_to(model, self.budget_bytes)
            self._ready[model].clear()
            self._crashed.add(model)
            self._wake.set()

    def _measure(self) -> None:
        with self._lock:
            servers = [(m, s) for m, s in self._servers.items() if self._ready[m].is_set()]
        for model, server in servers:
            self._measure_one(model, server)

    def _measure_one(self, model: str, server: ServerSupervisor) -> None:
        pid = server.pid
        resident = None if pid is None else resident_bytes(pid)
        if resident is not None:
            self.sizes.measured(model, resident)

    def _usage(self) -> tuple[int, int]:
        return self.used_bytes(), self.budget_bytes

    def _labels(self, model: str) -> dict[str, str]:
        return self.metrics.labels(model)

    def _publish_gauges(self) -> None:
        loaded = set(self.loaded())
        self.metrics.loaded_count.set(len(loaded))
        self.metrics.used.set(self.used_bytes())
        for model in self.specs:
            self.metrics.loaded.labels(**self._labels(model)).set(1 if model in loaded else 0)
            self.metrics.size.labels(**self._labels(model)).set(self.sizes.size(model))
