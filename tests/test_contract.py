"""The job contract refuses bad requests with a reason a caller can act on (no Redis needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from jobcontract.limits import Limits
from jobcontract.models import Backend, GenerationRequest, GenerationResult, JobState, Timings, Usage
from jobcontract.routes import Routes

LIMITS = Limits(max_tokens=100, max_prompt_chars=50, models={"tiny": ("mlx", "llamacpp"), "gguf-only": ("llamacpp",)})


def admit(**fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate(fields, context={"limits": LIMITS})


def test_a_good_request_passes() -> None:
    request = admit(model="tiny", prompt="hello", max_tokens=10, stop="\n")
    assert request.stop == ["\n"]
    assert admit(model="tiny", messages=[{"role": "user", "content": "hi"}]).prompt is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"model": "nope", "prompt": "x"}, "unknown model 'nope'"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 101}, "over this deployment's cap of 100"),
        ({"model": "tiny", "prompt": "x" * 51}, "over the limit of 50"),
        ({"model": "tiny"}, "exactly one of 'prompt' or 'messages'"),
        ({"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"model": "gguf-only", "prompt": "x", "backend": "mlx"}, "not in the route"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, "greater than or equal to 0"),
        ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"model": "../etc/passwd", "prompt": "x"}, "should match pattern"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "greater than or equal to 1"),
        ({"model": "tiny", "prompt": "x", "surprise": 1}, "Extra inputs are not permitted"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "y"}]}, "role"),
    ],
)
def test_bad_requests_are_refused_with_their_reason(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValidationError) as error:
        admit(**fields)
    assert reason in str(error.value)


def test_routes_infer_the_backend_from_the_model_format(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "routes.toml").write_text(
        '[[models]]\nname = "m"\n'
        '[[models.backends]]\npath = "weights"\nmax_attempts = 1\n'
        '[[models.backends]]\npath = "/models/m.Q4.gguf"\n'
    )
    routes = Routes.from_file(tmp_path / "routes.toml")
    model = routes.get("m")
    assert model.order == (Backend.MLX, Backend.LLAMACPP)
    assert model.backends[0].path == str(tmp_path / "weights")
    assert model.next_after(Backend.MLX) is Backend.LLAMACPP
    assert model.next_after(Backend.LLAMACPP) is None


def test_a_route_may_not_list_a_backend_twice() -> None:
    with pytest.raises(ValidationError, match="lists a backend twice"):
        Routes.model_validate({"models": [{"name": "m", "backends": [{"path": "a"}, {"path": "b"}]}]})


def test_result_timings_are_derived_from_instants() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    result = GenerationResult(
        job_id="j",
        model="tiny",
        state=JobState.SUCCEEDED,
        usage=Usage(prompt_tokens=3, completion_tokens=10),
        timings=Timings(
            enqueued_at=t0,
            started_at=t0 + timedelta(milliseconds=5),
            first_token_at=t0 + timedelta(milliseconds=25),
            finished_at=t0 + timedelta(milliseconds=125),
        ),
    )
    dumped = result.model_dump()
    assert dumped["timings"]["queue_wait_s"] == pytest.approx(0.005)
    assert dumped["timings"]["time_to_first_token_s"] == pytest.approx(0.025)
    assert dumped["timings"]["generation_s"] == pytest.approx(0.120)
    assert dumped["usage"]["total_tokens"] == 13
    assert dumped["tokens_per_s"] == pytest.approx(100.0)
