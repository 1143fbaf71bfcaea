"""The job contract under hypothesis: arbitrary JSON-ish input is either refused with a clean
ValidationError and leaves Redis untouched, or queued as a job a worker can read back exactly.
Never another exception. `--soak` runs many more cases."""

from __future__ import annotations

import math
from typing import Any

import dramatiq
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobcontract.jobs import IdempotencyConflict
from jobcontract.keys import Keys
from jobcontract.models import GenerationRequest
from producer.client import Client
from tests.queues import entries as entries_of
from tests.reliability_figures import Figure, FigureBook

FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "timeout_s",
    "idempotency_key",
    "metadata",
    "backend",
    "lane",
    "stream",
]

# Every character, lone surrogates and NUL included: what a JSON body can carry.
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=10,
)


def near(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values for a field, sometimes anything at all."""
    return st.one_of(valid, valid, json_values)


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": near(st.sampled_from(["tiny", "Tiny", "tiny ", "../tiny", "gpt-17", "", "t" * 65])),
    "prompt": near(any_text | st.text(max_size=300)),
    "messages": near(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]), "content": any_text}
            ),
            max_size=3,
        )
    ),
    "max_tokens": near(st.integers(-5, 5000) | st.sampled_from([4096, 4097, 10**6, 10**7, 2**64])),
    "temperature": near(st.floats(-1, 3) | st.sampled_from([math.nan, math.inf, "0.5"])),
    "top_p": near(st.floats(-0.5, 1.5) | st.just(0.0)),
    "stop": near(any_text | st.lists(any_text, max_size=6)),
    "seed": near(st.integers(-1, 2**64)),
    "timeout_s": near(st.floats(-1, 10**7) | st.just(0)),
    "idempotency_key": near(any_text),
    "metadata": near(st.dictionaries(any_text, any_text, max_size=20)),
    "backend": near(st.sampled_from(["mlx", "llamacpp", "cuda", "MLX"])),
    "lane": near(st.sampled_from(["interactive", "batch", "urgent"])),
    "stream": near(st.booleans()),
}

requests = st.fixed_dictionaries(
    {"model": FIELD_VALUES["model"]},
    optional={
        **{name: FIELD_VALUES[name] for name in FIELDS if name != "model"},
        "surprise": json_values,
    },
)
# The same fields with plausible values only, so accepted requests are common enough to check.
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny", "gpt-17"])},
    optional={
        "prompt": st.text(max_size=200),
        "max_tokens": st.integers(1, 5000),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=5),
        "seed": st.integers(0, 2**63),
        "idempotency_key": st.text(min_size=1, max_size=12),
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "lane": st.sampled_from(["interactive", "batch"]),
        "stream": st.booleans(),
    },
)
anything = st.one_of(plausible, requests, requests, json_values)


@pytest.fixture
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    return 3000 if request.config.getoption("--soak") else 400


def _footprint(r: redis.Redis, keys: Keys) -> tuple[int, int]:
    """How many job records exist and how many entries wait in all queues of this namespace (a queue's
    bell, rung when a partition is made, holds no job)."""
    jobs = sum(1 for k in r.scan_iter(f"{keys.namespace}:job:*") if not k.endswith(b":events"))
    streams = r.scan_iter(f"{keys.namespace}:q:*", _type="stream")
    entries = sum(r.xlen(k) for k in streams if not k.endswith(b":bell"))
    return jobs, entries


def test_validation_refuses_cleanly_or_accepts(
    fuzz_examples: int, figures: FigureBook, client: Client, request: pytest.FixtureRequest
) -> None:
    limits = client.settings.limits
    seen = {"cases": 0, "valid": 0, "refused": 0}

    @hypothesis_settings(max_examples=fuzz_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=anything)
    def check(data: Any) -> None:
        seen["cases"] += 1
        try:
            accepted = GenerationRequest.model_validate(data, context={"limits": limits})
        except ValidationError:
            seen["refused"] += 1
            return
        seen["valid"] += 1
        # What a worker receives is what the caller was promised.
        dumped = accepted.model_dump(mode="json", exclude_defaults=True)
        assert GenerationRequest.model_validate(dumped) == accepted

    check()
    figures.record(
        Figure(
            test=request.node.name,
            fault="fuzzed request validation (hypothesis)",
            jobs=seen["cases"],
            faults_injected=seen["refused"],
            lost=0,
            duplicated=0,
            extra=dict(seen),
        )
    )
    assert seen["valid"] > 0 and seen["refused"] > 0, seen


def test_submit_queues_exactly_the_valid_requests(
    fuzz_examples: int, figures: FigureBook, client: Client, keys: Keys, request: pytest.FixtureRequest
) -> None:
    seen = {"cases": 0, "queued": 0, "refused": 0, "other_errors": 0}

    @hypothesis_settings(max_examples=fuzz_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=anything)
    def check(data: Any) -> None:
        seen["cases"] += 1
        before = _footprint(client.redis, keys)
        try:
            job_id = client.submit(data)
        except ValidationError:
            seen["refused"] += 1
            assert _footprint(client.redis, keys) == before, "an invalid request left something in Redis"
            return
        except IdempotencyConflict:  # a key seen before with another request: refused, nothing new
            seen["refused"] += 1
            assert _footprint(client.redis, keys) == before, "a refused request left something in Redis"
            return
        except Exception:
            seen["other_errors"] += 1
            raise
        jobs, entries = _footprint(client.redis, keys)
        if jobs == before[0]:  # an idempotency key seen before: the earlier job, nothing new
            assert entries == before[1]
            return
        seen["queued"] += 1
        assert (jobs, entries) == (before[0] + 1, before[1] + 1)
        status = client.status(job_id)
        [(_id, fields)] = [e for e in entries_of(client.redis, keys, status.queue) if job_id.encode() in e[1][b"m"]]
        message = dramatiq.Message.decode(fields[b"m"])
        queued = GenerationRequest.model_validate(message.kwargs["request"])
        assert queued == client.validate(data), "the worker would read another request than the one checked"

    check()
    figures.record(
        Figure(
            test=request.node.name,
            fault="fuzzed Client.submit on a private Redis (hypothesis)",
            jobs=seen["cases"],
            faults_injected=seen["refused"],
            lost=0,
            duplicated=0,
            extra=dict(seen),
        )
    )
    assert seen["queued"] > 0 and seen["refused"] > 0, seen
