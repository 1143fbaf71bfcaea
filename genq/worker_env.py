"""The environment of every `genq worker` that genq starts itself (the demo, the benchmarks, the tests).

One rule (`worker_env`): this process's environment *without* any `GENQ_` variable, plus the
starter's settings written out as `GENQ_` variables. A worker serves what its starter's settings
object says and nothing else: a `GENQ_REDIS_URL` or `GENQ_PROCESSES` left in a shell (on a shared
machine, the shared Redis) can never point a test, a benchmark or the demo at another Redis or
change what it measures. Anything else a worker needs is passed explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from jobcontract.settings import GenqSettings

_NOT_PASSED = ("PROMETHEUS_MULTIPROC_DIR",)  # a worker with metrics makes its own


def settings_env(settings: GenqSettings) -> dict[str, str]:
    """Every shared setting as the `GENQ_` variable that gives it (unset optional ones left out)."""
    env = {}
    for name in GenqSettings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"GENQ_{name.upper()}"] = str(value)
    return env


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its GENQ_ settings, plus `extra`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_") and k not in _NOT_PASSED}
    return {**inherited, **(extra or {})}


def worker_env(settings: GenqSettings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the stack starts: see the module's docstring for why."""
    return base_env({**settings_env(settings), **(extra or {})})
