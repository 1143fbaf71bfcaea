"""The multi-model worker's load/unload plan, its size records and admission's fit check, as pure
functions: every rule, no servers needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobcontract.admission import ModelTooLarge, refuse_too_large
from jobcontract.protocol.placement import WorkerModels
from workers.models.plan import Drain, Load, ModelState, TooLarge, Unload, UnloadReason, Wait, plan
from workers.models.sizes import ModelSizes
from workers.settings import WorkerSettings

GB = 1_000_000_000


def state(
    size_gb: float,
    *,
    loaded: bool = False,
    generating: int = 0,
    waiting: int = 0,
    last_used: float = 0.0,
    draining: bool = False,
    since: float = 0.0,
) -> ModelState:
    return ModelState(
        size_bytes=int(size_gb * GB),
        loaded=loaded,
        generating=generating,
        waiting=waiting,
        last_used=last_used,
        draining=draining,
        waiting_since=since,
    )


def run(
    models: dict[str, ModelState], *, budget_gb: float = 10, keep_alive_s: float = 300, now: float = 1000
) -> tuple[object, ...]:
    return plan(models=models, budget_bytes=int(budget_gb * GB), keep_alive_s=keep_alive_s, now=now)


def test_a_wanted_model_that_fits_beside_the_loaded_ones_is_loaded_with_nothing_unloaded() -> None:
    models = {"a": state(4, loaded=True, last_used=990), "b": state(4, waiting=1)}
    assert run(models) == (Load("b"),)


def test_the_least_recently_used_idle_model_is_swapped_out_to_make_room() -> None:
    models = {
        "a": state(4, loaded=True, last_used=900),
        "b": state(4, loaded=True, last_used=950),
        "c": state(4, waiting=3),
    }
    assert run(models) == (Unload("a", UnloadReason.SWAP), Load("c"))


def test_as_many_idle_models_go_as_the_new_one_needs_and_no_more() -> None:
    models = {
        "a": state(3, loaded=True, last_used=900),
        "b": state(3, loaded=True, last_used=910),
        "c": state(3, loaded=True, last_used=920),
        "d": state(6, waiting=1),
    }
    assert run(models) == (Unload("a", UnloadReason.SWAP), Unload("b", UnloadReason.SWAP), Load("d"))


def test_a_generating_model_is_drained_not_unloaded_and_the_wanted_one_waits() -> None:
    models = {"a": state(6, loaded=True, generating=2, last_used=990), "b": state(6, waiting=1)}
    assert run(models) == (Wait("b", 6 * GB, 4 * GB), Drain("a", "b"))


def test_a_drained_model_runs_the_jobs_held_for_it_before_it_is_swapped_out() -> None:
    # Its queue gives it no more (the drain), but the jobs the worker holds for it would want it
    # back the moment it went: a swap for nothing, then another.
    models = {
        "a": state(6, loaded=True, waiting=3, draining=True, last_used=990),
        "b": state(6, waiting=1, since=5),
    }
    assert run(models) == (Wait("b", 6 * GB, 4 * GB), Drain("a", "b"))
    idle = {**models, "a": state(6, loaded=True, draining=True, last_used=995)}
    assert run(idle) == (Unload("a", UnloadReason.SWAP), Load("b"))


def test_a_loaded_model_with_jobs_about_to_run_is_not_evicted() -> None:
    models = {"a": state(6, loaded=True, waiting=2, last_used=10), "b": state(6, waiting=1)}
    assert run(models) == (Wait("b", 6 * GB, 4 * GB), Drain("a", "b"))


def test_only_the_busy_models_needed_are_drained_least_recently_used_first() -> None:
    models = {
        "a": state(3, loaded=True, generating=1, last_used=990),
        "b": state(3, loaded=True, generating=1, last_used=900),
        "c": state(3, loaded=True, generating=1, last_used=950),
        "d": state(3, waiting=1),
    }
    assert run(models) == (Wait("d", 3 * GB, GB), Drain("b", "d"))


def test_the_longest_waiting_model_goes_first_and_alone_drains() -> None:
    models = {
        "a": state(6, loaded=True, generating=1, last_used=990),
        "b": state(6, waiting=1, since=20),
        "c": state(6, waiting=4, since=10),
    }
    assert run(models) == (Wait("c", 6 * GB, 4 * GB), Drain("a", "c"), Wait("b", 6 * GB, 4 * GB))


def test_a_model_larger_than_the_whole_budget_is_refused_and_nothing_is_unloaded_for_it() -> None:
    models = {"a": state(2, loaded=True, last_used=990), "big": state(12, waiting=1)}
    assert run(models) == (TooLarge("big", 12 * GB, 10 * GB),)


def test_keep_alive_unloads_idle_models_only() -> None:
    models = {
        "old": state(1, loaded=True, last_used=600),
        "busy_old": state(1, loaded=True, generating=1, last_used=600),
        "awaited_old": state(1, loaded=True, waiting=1, last_used=600),
        "recent": state(1, loaded=True, last_used=900),
    }
    assert run(models, keep_alive_s=300) == (Unload("old", UnloadReason.KEEP_ALIVE),)


def test_a_model_over_budget_after_a_crash_sheds_idle_models_least_recent_first() -> None:
    models = {
        "crashed": state(10, loaded=True, generating=1, last_used=999),
        "a": state(2, loaded=True, last_used=800),
        "b": state(2, loaded=True, last_used=700),
    }
    assert run(models) == (Unload("b", UnloadReason.OVER_BUDGET), Unload("a", UnloadReason.OVER_BUDGET))


def test_two_wanted_models_that_fit_together_are_both_loaded_longest_waiting_first() -> None:
    models = {"a": state(3, waiting=1, since=20), "b": state(3, waiting=1, since=10)}
    assert run(models) == (Load("b"), Load("a"))


def test_a_second_wanted_model_does_not_evict_the_first_just_planned() -> None:
    models = {"a": state(6, waiting=1, since=1), "b": state(6, waiting=1, since=2)}
    assert run(models) == (Load("a"), Wait("b", 6 * GB, 4 * GB))


def test_sizes_start_from_files_then_measure_then_add_the_overhead_seen_to_unmeasured_models() -> None:
    sizes = ModelSizes({"a": 100, "b": 200})
    assert sizes.size("a") == 100
    sizes.measured("a", 1100)  # the server holds an interpreter and caches beside the weights
    assert sizes.size("a") == 1100
    assert sizes.size("b") == 1200  # files + the overhead seen on a
    sizes.measured("a", 900)  # a lower sample does not lower the peak
    assert sizes.size("a") == 1100
    sizes.measured("b", 50)  # never below the files
    assert sizes.size("b") == 200


def test_a_raised_size_holds_against_later_measurements() -> None:
    sizes = ModelSizes({"a": 100})
    sizes.raise_to("a", 5000)
    sizes.measured("a", 300)
    assert sizes.size("a") == 5000 and sizes.raised("a")


def worker(name: str, budget: int | None, sizes: dict[str, int], loaded: tuple[str, ...] = ()) -> WorkerModels:
    return WorkerModels(
        worker=name, host="h", backend="mlx", budget_bytes=budget, serves=tuple(sizes), loaded=loaded, sizes=sizes
    )


def test_admission_refuses_a_model_no_live_worker_can_hold_naming_its_size_and_the_largest_budget() -> None:
    fleet = [worker("w1", 4 * GB, {"big": 9 * GB, "small": GB}), worker("w2", 6 * GB, {"big": 8 * GB})]
    refuse_too_large(["small"], fleet)  # fits
    with pytest.raises(ModelTooLarge) as refused:
        refuse_too_large(["small", "big"], fleet)
    assert (refused.value.model, refused.value.size_bytes, refused.value.largest_budget_bytes) == (
        "big",
        8 * GB,
        6 * GB,
    )
    assert "'big'" in str(refused.value) and str(8 * GB) in str(refused.value) and str(6 * GB) in str(refused.value)


def test_admission_lets_a_model_through_when_one_worker_fits_it_or_nobody_published_it() -> None:
    fleet = [worker("w1", 4 * GB, {"big": 9 * GB}), worker("w2", 10 * GB, {"big": 9 * GB})]
    refuse_too_large(["big"], fleet)
    refuse_too_large(["unpublished"], fleet)
    refuse_too_large(["big"], [worker("single", None, {"big": 90 * GB}, loaded=("big",))])  # --model: no budget


def test_a_worker_record_reads_back_as_written() -> None:
    record = worker("w", 5, {"a": 1, "b": 2}, loaded=("a",))
    assert WorkerModels.from_json(record.to_json()) == record


def test_models_setting_reads_a_list_all_or_the_one_model(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        "\n".join(
            [
                '[[models]]\nname = "a"\n[[models.backends]]\npath = "a-folder"',
                '[[models]]\nname = "g"\n[[models.backends]]\npath = "g.gguf"',
                '[[models]]\nname = "b"\n[[models.backends]]\npath = "b-folder"\n[[models.backends]]\npath = "b.gguf"',
            ]
        )
    )

    def served(**given: object) -> list[str]:
        return WorkerSettings(routes_file=routes, **given).served_models()  # type: ignore[arg-type]

    assert served(model="a") == ["a"]
    assert served(serve_models="all") == ["a", "b"]  # g has no mlx route
    assert served(serve_models="all", backend="llamacpp") == ["g", "b"]
    assert served(serve_models=" b, a,b ") == ["b", "a"]
    with pytest.raises(ValueError, match="no mlx route"):
        served(serve_models="a,g")
    with pytest.raises(KeyError):
        served(serve_models="a,nope")
    settings = WorkerSettings(routes_file=routes, serve_models="all", memory_budget_gb=3, processes=2)
    assert settings.budget_bytes_per_process() == 3 * 1024**3 // 2
