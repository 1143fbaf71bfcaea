"""What an idle worker no longer does on a timer (issue #12), and what still wakes it: the models
publisher sends its record when it changed or its renewal is due, not every look; the supervisor
sleeps until a vouch is due and is woken at once by stop() (a signal) or a child's exit."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobcontract import protocol
from jobcontract.keys import Keys
from jobcontract.protocol.placement import ReadModels, WorkerModels
from workers.models import publisher as publisher_module
from workers.models.publisher import ModelsPublisher
from workers.settings import WorkerSettings
from workers.supervisor import WorkerPool


def record(loaded: tuple[str, ...]) -> WorkerModels:
    return WorkerModels(
        worker="w1", host="h", backend="mlx", budget_bytes=None, serves=("tiny",), loaded=loaded, sizes={"tiny": 1}
    )


def counting(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    sent: list[Any] = []
    real = publisher_module.protocol.run

    def run(client: redis.Redis, op: Any) -> Any:
        sent.append(op)
        return real(client, op)

    monkeypatch.setattr(publisher_module.protocol, "run", run)
    return sent


def test_an_unchanged_record_is_not_sent_again_until_its_renewal(
    redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = counting(monkeypatch)
    state = {"loaded": ()}
    publisher = ModelsPublisher(redis_client, keys, lambda: record(state["loaded"]), ttl_s=30.0)
    publisher.publish()
    publisher.publish()
    assert len(sent) == 1
    state["loaded"] = ("tiny",)  # the server came up: sent at once
    publisher.publish()
    assert len(sent) == 2
    assert [r.loaded for r in protocol.run(redis_client, ReadModels(keys))] == [("tiny",)]


def test_an_unchanged_record_is_renewed_before_it_lapses(
    redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = counting(monkeypatch)
    publisher = ModelsPublisher(redis_client, keys, lambda: record(()), ttl_s=0.3)  # renewed every 0.1 s
    publisher.publish()
    time.sleep(0.15)
    publisher.publish()
    assert len(sent) == 2


def test_a_poke_makes_the_publisher_look_at_once(
    redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread sleeps until a renewal (here far away); a server's state change pokes it."""
    sent = counting(monkeypatch)
    state = {"loaded": ()}
    publisher = ModelsPublisher(redis_client, keys, lambda: record(state["loaded"]), ttl_s=600.0)
    publisher.start()
    try:
        assert wait_for(lambda: len(sent) == 1)
        state["loaded"] = ("tiny",)
        publisher.poke()
        assert wait_for(lambda: len(sent) == 2), "the poke was not answered before the renewal"
    finally:
        publisher.stop()


def test_stop_wakes_the_supervisor_waiting_on_its_children(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[[models]]\nname = "tiny"\n[[models.backends]]\npath = "tiny-mlx"\n')
    pool = WorkerPool(WorkerSettings(routes_file=routes, model="tiny", redis_url="redis://127.0.0.1:1/0"))
    waiting = threading.Thread(target=pool._wait, args=(600.0,), daemon=True)
    waiting.start()
    pool.stop()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and pool.stopping.is_set()


def test_a_childs_exit_wakes_the_supervisor(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[[models]]\nname = "tiny"\n[[models.backends]]\npath = "tiny-mlx"\n')
    pool = WorkerPool(WorkerSettings(routes_file=routes, model="tiny", redis_url="redis://127.0.0.1:1/0"))
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0.5,))
    child.start()
    pool.children.append(_child(child))
    waiting = threading.Thread(target=pool._wait, args=(600.0,), daemon=True)
    waiting.start()
    waiting.join(timeout=60)
    child.join()
    assert not waiting.is_alive()


def _child(process: Any) -> Any:
    from workers.spawner import Child

    context = multiprocessing.get_context("spawn")
    return Child(name="c", process=process, ready=context.Event(), vouched=context.Event())


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
