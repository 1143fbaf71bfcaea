"""Which models a multi-model worker loads and unloads next: a pure function of what it holds.

Like workers/policy.py's decide(), every rule lives in one function of plain values returning frozen
decisions, so the whole policy can be read, and tested, without a server; workers/models/manager.py
carries the decisions out (starts and stops the servers) and feeds the next call what happened.

The rules, in order:
1. A loaded model idle (no job in flight, none waiting for it) longer than the keep-alive is unloaded.
2. Models held over the budget (a model's recorded size was raised after its server died) shed the
   least recently used idle models until they fit again.
3. Each wanted model that is not loaded is loaded if it fits beside what stays; to make it fit, the
   least recently used idle models are unloaded (a swap). A model larger than the whole budget is
   refused (TooLarge); one that would fit only once busy models finish waits (Wait): a model
   generating for a job is never unloaded under it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class UnloadReason(StrEnum):
    KEEP_ALIVE = "keep_alive"  # idle past GENQ_MODEL_KEEP_ALIVE_S
    SWAP = "swap"  # made room for another model
    OVER_BUDGET = "over_budget"  # held more than the budget (a size raised after a crash)
    CRASHED = "crashed"  # its server died: the manager unloads it, not the plan


@dataclass(frozen=True)
class ModelState:
    """What the manager knows of one model this worker may serve."""

    size_bytes: int  # recorded size: from its files, then measured, raised after a crash
    loaded: bool  # a server runs (or is starting) for it
    in_flight: int  # jobs generating on it, or waiting for it to load
    last_used: float  # monotonic seconds of its last job (0 if never)


@dataclass(frozen=True)
class Load:
    model: str


@dataclass(frozen=True)
class Unload:
    model: str
    reason: UnloadReason


@dataclass(frozen=True)
class Wait:
    """Wanted, fits the budget, but not beside the busy models: asked again on the next pass."""

    model: str
    needed_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class TooLarge:
    model: str
    size_bytes: int
    budget_bytes: int


Decision = Load | Unload | Wait | TooLarge


def plan(
    *,
    models: Mapping[str, ModelState],
    wanted: Sequence[str],
    budget_bytes: int,
    keep_alive_s: float,
    now: float,
) -> tuple[Decision, ...]:
    """The unloads and loads to do now, unloads first (memory is freed before it is taken).

    `wanted`: models jobs are waiting for, in the order they asked; a wanted model is never
    unloaded for being idle. A model with jobs in flight is never unloaded at all."""
    decisions: list[Decision] = []
    held = {name for name, state in models.items() if state.loaded}

    def idle(name: str) -> bool:
        return models[name].in_flight == 0 and name not in wanted

    def used() -> int:
        return sum(models[name].size_bytes for name in held)

    def victims() -> list[str]:
        """Idle loaded models, least recently used first."""
        return sorted((n for n in held if idle(n)), key=lambda n: (models[n].last_used, n))

    def unload(name: str, reason: UnloadReason) -> None:
        held.discard(name)
        decisions.append(Unload(name, reason))

    for name in sorted(held):
        if idle(name) and now - models[name].last_used > keep_alive_s:
            unload(name, UnloadReason.KEEP_ALIVE)
    for name in victims():
        if used() <= budget_bytes:
            break
        unload(name, UnloadReason.OVER_BUDGET)
    for name in dict.fromkeys(wanted):  # each once, in the order asked
        state = models.get(name)
        if state is None or state.loaded:
            continue
        if state.size_bytes > budget_bytes:
            decisions.append(TooLarge(name, state.size_bytes, budget_bytes))
            continue
        free = budget_bytes - used()
        evictable = victims()
        if free + sum(models[v].size_bytes for v in evictable) < state.size_bytes:
            decisions.append(Wait(name, state.size_bytes, free))
            continue
        for victim in evictable:
            if budget_bytes - used() >= state.size_bytes:
                break
            unload(victim, UnloadReason.SWAP)
        held.add(name)
        decisions.append(Load(name))
    return tuple(decisions)
