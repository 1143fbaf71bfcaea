"""The job contract refuses bad requests with a reason a caller can act on (no Redis needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobcontract.admission import build_message, request_fingerprint
from jobcontract.limits import Limits
from jobcontract.models import (
    Backend,
    GenerationRequest,
    GenerationResult,
    JobState,
    Lane,
    PromptTokensDetails,
    Timings,
    Usage,
)
from jobcontract.prefix import PREFIX_CHARS, leading_text, prefix_fingerprint, prefix_of
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


# -- the prefix fingerprint (jobcontract.prefix) -------------------------------------------------------
INSTRUCTION = "Classify the sentiment of the review below as positive, negative or mixed. " * 20  # 1,540 chars


def test_jobs_sharing_their_leading_part_share_a_fingerprint_and_others_do_not() -> None:
    one = GenerationRequest(model="tiny", prompt=INSTRUCTION + "Review: great.")
    two = GenerationRequest(model="tiny", prompt=INSTRUCTION + "Review: awful.", max_tokens=9, temperature=0)
    other = GenerationRequest(model="tiny", prompt="Summarise. " + INSTRUCTION)
    fingerprint = prefix_fingerprint(one)
    assert fingerprint is not None and re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert prefix_fingerprint(two) == fingerprint  # sampling settings and the varying tail do not count
    assert prefix_fingerprint(other) != fingerprint
    # Only the first `chars` characters count: a difference past them is the same prefix.
    assert prefix_fingerprint(GenerationRequest(model="tiny", prompt=INSTRUCTION[:PREFIX_CHARS] + "x")) == fingerprint
    changed = INSTRUCTION[: PREFIX_CHARS - 1] + "!"
    assert prefix_fingerprint(GenerationRequest(model="tiny", prompt=changed)) != fingerprint
    # Shorter than the leading part: the whole prompt is the prefix.
    short = GenerationRequest(model="tiny", prompt="hello")
    assert prefix_fingerprint(short) == prefix_fingerprint(short.model_copy()) != prefix_fingerprint(one)


def test_a_chat_is_fingerprinted_on_its_canonical_rendering_in_order() -> None:
    def chat(*messages: tuple[str, str]) -> GenerationRequest:
        return GenerationRequest(model="tiny", messages=[{"role": r, "content": c} for r, c in messages])

    system = chat(("system", INSTRUCTION), ("user", "Review: great."))
    assert prefix_fingerprint(system) == prefix_fingerprint(chat(("system", INSTRUCTION), ("user", "Review: bad.")))
    # The role is part of the rendering, and a prompt never shares a chat's fingerprint.
    assert prefix_fingerprint(chat(("user", INSTRUCTION))) != prefix_fingerprint(system)
    assert prefix_fingerprint(GenerationRequest(model="tiny", prompt=INSTRUCTION)) != prefix_fingerprint(
        chat(("user", INSTRUCTION))
    )
    # Short messages: the leading part runs across them, in order.
    assert prefix_fingerprint(chat(("system", "a"), ("user", "b"))) != prefix_fingerprint(
        chat(("system", "b"), ("user", "a"))
    )
    assert leading_text(chat(("system", "ab"), ("user", "cd")), 6) == "system"
    assert len(leading_text(chat(("system", "x" * 50), *[("user", "y" * 500)] * 100), 64)) == 64


def test_the_leading_part_is_set_per_model_in_the_routes_and_zero_turns_it_off() -> None:
    routes = Routes.model_validate(
        {
            "models": [
                {"name": "m", "backends": [{"path": "a"}]},
                {"name": "n", "prefix_chars": 0, "backends": [{"path": "a"}]},
            ]
        }
    )
    assert routes.get("m").prefix_chars == PREFIX_CHARS
    assert routes.get("n").prefix_chars == 0
    request = GenerationRequest(model="tiny", prompt=INSTRUCTION)
    assert prefix_fingerprint(request, 0) is None
    assert prefix_fingerprint(request, 10) == prefix_fingerprint(
        GenerationRequest(model="tiny", prompt=INSTRUCTION[:10])
    )
    message = build_message("j", request, "tiny.mlx.interactive", Lane.INTERACTIVE, prefix=prefix_fingerprint(request))
    assert prefix_of(message.options) == prefix_fingerprint(request)
    assert prefix_of(build_message("j", request, "tiny.mlx.interactive", Lane.INTERACTIVE).options) is None


def test_a_result_carries_its_cached_prompt_tokens_and_one_stored_without_them_still_reads() -> None:
    from datetime import UTC, datetime

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    usage = Usage(prompt_tokens=730, completion_tokens=8, prompt_tokens_details=PromptTokensDetails(cached_tokens=724))
    result = GenerationResult(
        job_id="j", model="tiny", state=JobState.SUCCEEDED, usage=usage, timings=Timings(enqueued_at=t0, finished_at=t0)
    )
    stored = result.model_dump(mode="json")
    assert stored["usage"]["prompt_tokens_details"] == {"cached_tokens": 724}
    del stored["usage"]["prompt_tokens_details"]  # a result written before cached tokens were reported
    assert GenerationResult.model_validate(stored).usage.prompt_tokens_details.cached_tokens == 0


def test_a_prompt_cache_key_names_the_prefix_and_is_neither_part_of_the_ask_nor_sent_to_workers() -> None:
    keyed = GenerationRequest(model="tiny", prompt="Short rubric A. Review: good.", prompt_cache_key="rubric-a")
    other = GenerationRequest(model="tiny", prompt="Totally different text.", prompt_cache_key="rubric-a")
    assert prefix_fingerprint(keyed) == prefix_fingerprint(other) == prefix_fingerprint(keyed, 0)
    assert prefix_fingerprint(keyed) != prefix_fingerprint(keyed.model_copy(update={"prompt_cache_key": "rubric-b"}))
    assert prefix_fingerprint(keyed) != prefix_fingerprint(keyed.model_copy(update={"prompt_cache_key": None}))
    # The same ask with or without a key is the same ask (its idempotency fingerprint), and a worker
    # gets the request without it: the fingerprint in the message's options carries its effect.
    assert request_fingerprint(keyed) == request_fingerprint(keyed.model_copy(update={"prompt_cache_key": None}))
    message = build_message("j", keyed, "tiny.mlx.interactive", Lane.INTERACTIVE)
    assert "prompt_cache_key" not in message.kwargs["request"]
    assert GenerationRequest.model_validate(message.kwargs["request"]).prompt == keyed.prompt
