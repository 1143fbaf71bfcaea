"""A pytest plugin: whatever a fixture or a test started through genq/processes.py is stopped the
moment that fixture or test fails, not left running until the session ends (or forever, when the
session is killed). A fixture that starts a worker and then fails on a missing tool never reaches
its teardown; this reaches it for it.

What passes keeps its processes: a module-scoped fixture's worker serves the module's tests and
is stopped by the fixture's own teardown."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from genq import processes


def _stopping_on_failure() -> Generator[None, Any, Any]:
    point = processes.mark()
    try:
        return (yield)
    except BaseException:
        processes.stop_started_since(point)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    return (yield from _stopping_on_failure())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    return (yield from _stopping_on_failure())
