"""The one Redis-outage policy: the same patience, sync and async, from GENQ_REDIS_OUTAGE_PATIENCE_S."""

from __future__ import annotations

import asyncio

import pytest
import redis

from jobcontract.outage import FAIL_AT_ONCE, OutagePolicy
from jobcontract.settings import GenqSettings
from workers.settings import WorkerSettings


class Flaky:
    """Fails with an outage error `failures` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.ConnectionError("Connection refused")
        return "ok"


def test_a_short_outage_is_waited_out_sync_and_async() -> None:
    policy = OutagePolicy(5.0)
    assert policy.ride_out(Flaky(3)) == "ok"

    flaky = Flaky(3)

    async def call() -> str:
        return flaky()

    assert asyncio.run(policy.ride_out_async(call)) == "ok" and flaky.calls == 4


def test_callers_fail_at_once() -> None:
    flaky = Flaky(1)
    with pytest.raises(redis.ConnectionError):
        FAIL_AT_ONCE.ride_out(flaky)
    assert flaky.calls == 1


def test_an_outage_longer_than_the_patience_raises() -> None:
    with pytest.raises(redis.ConnectionError):
        OutagePolicy(0.2).ride_out(Flaky(1000))


def test_other_errors_are_not_outages() -> None:
    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        OutagePolicy(5.0).ride_out(broken)


def test_every_side_reads_the_same_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS_OUTAGE_PATIENCE_S", "7")
    assert GenqSettings().outage_policy == OutagePolicy(7.0)
    assert WorkerSettings().outage_policy == OutagePolicy(7.0)
