"""A multi-model worker's held jobs: jobs its consumers took for a model that is not loaded wait in
the consumer (its gate), not on a worker thread, and count for the model set as waiting, so a loaded
model whose jobs have no thread yet is not swapped out under them (the rotation bench/models.py saw:
every model unloaded while its jobs waited for threads, and wanted again at once).

The model set runs with stand-in servers (no process: sizes are set by hand) and its tend() is called
directly; the consumer runs on a real redis-server."""

from __future__ import annotations

import time

import dramatiq
import redis
from prometheus_client import CollectorRegistry

from jobcontract.broker import StreamsBroker
from jobcontract.consumer import StreamsConsumer
from jobcontract.keys import Keys
from jobcontract.models import Backend
from jobcontract.scheduling import Tier
from workers.metrics import ModelMetrics
from workers.models.manager import ModelSet
from workers.models.sizes import ModelSizes
from workers.process import gate, held_by_model, planner
from workers.servers.specs import ServerSpec
from workers.settings import WorkerSettings

QUEUE = "a.mlx.batch"
SPEC = ServerSpec(name="stand-in", backend=Backend.MLX, argv_head=("true",), port_flag="--port", readiness_path="/")


class StandIn:
    """What the model set asks of a server: started after `load_s`, no process to measure."""

    def __init__(self, load_s: float = 0.0) -> None:
        self.pid: int | None = None
        self.base_url = "http://127.0.0.1:1"
        self.stopped = False
        self.load_s = load_s

    def start(self) -> None:
        time.sleep(self.load_s)

    def stop(self) -> None:
        self.stopped = True

    def on_state(self, state: str) -> None:
        pass


def model_set(sizes: ModelSizes, budget: int, held: dict[str, int], load_s: float = 0.0) -> ModelSet:
    models = ModelSet(
        specs=dict.fromkeys(sizes.files, SPEC),
        sizes=sizes,
        budget_bytes=budget,
        keep_alive_s=600,
        make_server=lambda model, on_state: StandIn(load_s),  # type: ignore[arg-type,return-value]
        metrics=ModelMetrics("mlx", registry=CollectorRegistry()),
        load_wait_s=1.0,
    )
    models.watch_held(lambda: held)
    return models


def measured(**sizes: int) -> ModelSizes:
    recorded = ModelSizes(dict.fromkeys(sizes, 1))
    for model, size in sizes.items():
        recorded.measured(model, size)
    return recorded


def test_held_jobs_load_their_model_and_keep_it_from_a_swap_until_they_ran() -> None:
    held: dict[str, int] = {"a": 3}  # taken for a, none on a worker thread yet
    models = model_set(measured(a=100, b=100), budget=150, held=held)
    models.tend()
    assert models.loaded() == ["a"]
    assert models.runnable("a") and not models.runnable("b")  # b's jobs would wait in their consumer
    assert models.swap_wait("b") is None  # making room for b would unload a, which has work: its held jobs
    held["b"] = 2  # b's turn: its jobs are taken while a's still wait for threads
    models.tend()
    assert models.loaded() == ["a"], "a was swapped out under the jobs held for it"
    assert models.draining("a")  # its queue gives it no more
    for _ in range(3):  # a's held jobs run, drained or not
        models.enter("a")
        assert models.acquire("a", 0.1)
        models.leave("a", generating=True)
        held["a"] -= 1
    models.tend()  # a is idle now: swapped out for b
    models.tend()
    assert models.loaded() == ["b"]
    assert models.runnable("b") and not models.runnable("a")


def test_two_models_wanted_at_once_are_loaded_one_a_pass_each_planned_with_the_last_measured() -> None:
    sizes = ModelSizes({"a": 1, "b": 1})  # from the files: two fit, as far as anyone knows
    held = {"a": 1, "b": 1}
    models = model_set(sizes, budget=150, held=held)
    assert models.would_swap("b", also=["a"])  # beside a model not measured yet: no commitment
    models.tend()
    assert len(models.loaded()) == 1
    first = models.loaded()[0]
    sizes.measured(first, 100)  # its server's memory: two do not fit
    models.tend()
    assert models.loaded() == [first], "the second model was loaded on the first one's file size"
    assert models.would_swap("b" if first == "a" else "a")


def test_a_measured_overhead_lets_a_second_model_be_taken_beside_a_loaded_one() -> None:
    sizes = ModelSizes({"a": 1, "b": 1})
    models = model_set(sizes, budget=250, held={"a": 1})
    models.tend()
    sizes.measured("a", 100)  # b: its files plus a's overhead, about 100
    assert not models.would_swap("b")


def test_an_idle_model_is_swapped_out_for_jobs_once_its_idle_time_and_their_wait_add_up_to_its_load() -> None:
    held = {"a": 1}
    models = model_set(measured(a=100, b=100, c=100), budget=250, held=held, load_s=0.5)
    models.tend()  # a loaded, in 0.5 s
    held["b"] = 1
    models.tend()  # b loaded beside it
    assert models.loaded() == ["a", "b"]
    assert models.would_swap("c") and models.swap_wait("c") is None  # both have jobs
    models.enter("a")  # a's job runs, and its queue runs dry: more may be between two arrivals
    assert models.acquire("a", 0.1)
    models.leave("a", generating=True)
    held["a"] = 0
    owed = models.swap_wait("c")
    assert owed is not None and 0 < owed < 0.6  # c's jobs that waited that long may have a's room
    time.sleep(0.6)  # a sat idle as long as loading it back would take
    assert models.swap_wait("c") == 0.0
    assert models.swap_wait("c", also=["b", "a"]) is None  # jobs held for a again


def test_the_planner_takes_for_a_model_to_swap_in_once_the_one_in_its_way_is_idle() -> None:
    held = {"a": 1, "b": 1}
    models = model_set(measured(a=100, b=100, c=100), budget=250, held=held, load_s=0.3)
    models.tend()
    models.tend()
    assert models.loaded() == ["a", "b"]
    settings = WorkerSettings(max_swap_wait_s=600, prefix_affinity=False)
    queues = {"a.mlx.batch": 1, "b.mlx.batch": 1}
    take = planner(settings, models, frozenset, lambda: dict(queues))
    assert take("c.mlx.batch").tiers == ()  # a and b have jobs: c waits its turn (the bound is long)
    queues["a.mlx.batch"] = held["a"] = 0  # a's share is done
    time.sleep(0.4)  # and it sat idle longer than its load took
    assert take("c.mlx.batch").tiers == (Tier("c.mlx.batch"),)  # unloading a displaces no work: c now
    assert take("c.mlx.batch").block is False  # never a blocking read for a model not loaded


def test_in_a_steady_stream_a_model_to_swap_in_gets_its_turn_whatever_idle_moments_came_between() -> None:
    held = {"a": 1, "b": 1}
    models = model_set(measured(a=100, b=100, c=100), budget=250, held=held, load_s=0.3)
    models.tend()
    models.tend()
    settings = WorkerSettings(max_swap_wait_s=0.5, prefix_affinity=False)
    take = planner(settings, models, frozenset, lambda: {f"{m}.mlx.batch": n for m, n in held.items()})
    time.sleep(0.6)  # c has gone the bound without a turn
    held.update(a=0, b=0)  # a moment with nothing to do...
    take("c.mlx.batch")
    held.update(a=1, b=1)  # ...and jobs again
    assert take("c.mlx.batch").tiers == (Tier("c.mlx.batch", min_age_ms=500),)  # its jobs that waited the bound


def test_held_counts_are_summed_per_model_and_the_gate_opens_with_the_load() -> None:
    assert held_by_model({"a.mlx.batch": 2, "a.mlx.interactive": 1, "b.mlx.batch": 0}) == {"a": 3}
    held = {"a": 1}
    models = model_set(measured(a=100), budget=150, held=held)
    may_run = gate(models)
    assert not may_run("a.mlx.batch")
    assert may_run("a.mlx.batch.DQ")  # a retry waiting out its back-off is not held here
    models.tend()
    assert may_run("a.mlx.batch") and may_run("a.mlx.interactive")


def test_a_consumer_holds_its_jobs_back_while_its_gate_is_closed(redis_client: redis.Redis, keys: Keys) -> None:
    broker = StreamsBroker(redis_client, keys, consumer_name="c1", middleware=[])
    broker.declare_queue(QUEUE)
    opened = False
    broker.gate = lambda queue: opened
    for _ in range(2):
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="a", args=(), kwargs={}, options={}))
    consumer = broker.consume(QUEUE, prefetch=4, timeout=100)
    assert isinstance(consumer, StreamsConsumer)
    assert [next(consumer) for _ in range(5)] == [None] * 5
    assert broker.held() == {QUEUE: 2}  # taken and held: the model set counts them as waiting
    opened = True
    delivered = [next(consumer) for _ in range(2)]
    assert all(m is not None for m in delivered)
    consumer.close()
