"""Which models a multi-model worker loads, unloads and drains next: a pure function of what it holds.

Like workers/policy.py's decide(), every rule lives in one function of plain values returning frozen
decisions, so the whole policy can be read, and tested, without a server; workers/models/manager.py
carries the decisions out (starts and stops the servers) and feeds the next call what happened.

A job this worker took for a model is served: when it was worth taking (the consumer's scheduler
decides that, within GENQ_MAX_SWAP_WAIT_S), it is worth a swap. So a model generating for other jobs
does not keep it waiting forever: it is drained (its queue gives it no new job), runs the few jobs
the worker already holds for it (at most a consumer's prefetch), and is unloaded once idle. Unloaded
earlier, those jobs would want it back at once: a swap for nothing.

The rules, in order:
1. A loaded model with no job (generating or waiting) for longer than the keep-alive is unloaded.
2. Models held over the budget (a model's recorded size was raised after its server died) shed
   idle models, least recently used first, until they fit again.
3. Each wanted model (jobs wait for it, it is not loaded), longest waiting first, is loaded if it
   fits beside what stays; to make it fit, idle models (no job generating or waiting) are unloaded,
   least recently used first (a swap). A model larger than the whole budget is refused (TooLarge).
   One that would fit once busy models finish waits (Wait), and those busy models, least recently
   used first, as many as it needs, are drained (Drain). A model generating is never unloaded.
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
    generating: int  # jobs running on its server now
    waiting: int  # jobs waiting to use it (for its load, or for its drain to end)
    last_used: float  # monotonic seconds of its last job (0 if never)
    draining: bool = False  # drained on the last pass: takes no new job
    waiting_since: float = 0.0  # when its oldest waiting job started waiting


@dataclass(frozen=True)
class Load:
    model: str


@dataclass(frozen=True)
class Unload:
    model: str
    reason: UnloadReason


@dataclass(frozen=True)
class Drain:
    """Start no new job on this model: a wanted model needs its memory once its jobs finish."""

    model: str
    for_model: str


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


Decision = Load | Unload | Drain | Wait | TooLarge


def plan(
    *,
    models: Mapping[str, ModelState],
    budget_bytes: int,
    keep_alive_s: float,
    now: float,
) -> tuple[Decision, ...]:
    """The unloads, drains and loads to do now, unloads first (memory is freed before it is taken).
    A model is drained only while a Drain says so: the manager drains exactly this pass's set."""
    decisions: list[Decision] = []
    held = {name for name, state in models.items() if state.loaded}

    def used() -> int:
        return sum(models[name].size_bytes for name in held)

    def evictable() -> list[str]:
        """Loaded models running no job, that no job waits for (drained or not), least recently used
        first."""
        free = [n for n in held if models[n].generating == 0 and models[n].waiting == 0]
        return sorted(free, key=lambda n: (models[n].last_used, n))

    def unload(name: str, reason: UnloadReason) -> None:
        held.discard(name)
        decisions.append(Unload(name, reason))

    for name in sorted(held):
        state = models[name]
        if state.generating == 0 and state.waiting == 0 and now - state.last_used > keep_alive_s:
            unload(name, UnloadReason.KEEP_ALIVE)
    for name in evictable():
        if used() <= budget_bytes:
            break
        unload(name, UnloadReason.OVER_BUDGET)
    wanted = sorted(
        (n for n, s in models.items() if not s.loaded and s.waiting > 0), key=lambda n: (models[n].waiting_since, n)
    )
    drained = False
    loading: set[str] = set()  # loaded by this plan: its waiting jobs get their turn before any drain
    for name in wanted:
        size = models[name].size_bytes
        if size > budget_bytes:
            decisions.append(TooLarge(name, size, budget_bytes))
            continue
        free = budget_bytes - used()
        candidates = evictable()
        if free + sum(models[v].size_bytes for v in candidates) >= size:
            for victim in candidates:
                if budget_bytes - used() >= size:
                    break
                unload(victim, UnloadReason.SWAP)
            held.add(name)
            loading.add(name)
            decisions.append(Load(name))
            continue
        decisions.append(Wait(name, size, free))
        if drained:
            continue  # one swap at a time: the longest waiting model drains what it needs
        drained = True
        room = free + sum(models[v].size_bytes for v in candidates)
        busy = sorted((n for n in held - loading if n not in candidates), key=lambda n: (models[n].last_used, n))
        for victim in busy:
            if room >= size:
                break
            room += models[victim].size_bytes
            decisions.append(Drain(victim, name))
    return tuple(decisions)
