"""Redis round trips a job costs on the worker side, counted by the real redis-server
(INFO commandstats), not by timing."""

from __future__ import annotations

import redis

from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend
from workers.circuit import CircuitBreaker


def calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_success_with_no_failure_streak_costs_no_round_trip(redis_client: redis.Redis, keys: Keys) -> None:
    breaker = CircuitBreaker(redis_client, keys, "tiny", threshold=3)
    redis_client.config_resetstat()
    for _ in range(5):
        breaker.record_success(Backend.MLX)
    assert calls(redis_client, "del") == 0


def test_a_success_still_ends_a_streak_and_closes_an_open_circuit(redis_client: redis.Redis, keys: Keys) -> None:
    breaker = CircuitBreaker(redis_client, keys, "tiny", threshold=2)
    streak = keys.circuit(pool_name("tiny", Backend.MLX)) + ":streak"
    breaker.record_failure(Backend.MLX)
    assert redis_client.exists(streak)
    breaker.record_success(Backend.MLX)
    assert not redis_client.exists(streak)

    other = CircuitBreaker(redis_client, keys, "tiny", threshold=2)  # another worker opens the circuit
    other.record_failure(Backend.MLX)
    other.record_failure(Backend.MLX)
    assert breaker.is_open(Backend.MLX)  # this worker sees it open...
    breaker.record_success(Backend.MLX)  # ...and its success closes it
    assert not breaker.is_open(Backend.MLX)
