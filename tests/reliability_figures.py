"""A pytest plugin that collects the figures fault tests measure and reports them after the run.

The figures are the point of a fault test (the README quotes them), so they must reach the
reader whether or not pytest captured output: each test records a line here, the terminal
summary prints them all, and `reliability-figures.json` keeps them for docs and CI artifacts
(in the session's temporary folder, or where `--figures-file` says).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

_BOOK = pytest.StashKey["FigureBook"]()


@dataclass
class Figure:
    test: str
    fault: str
    jobs: int
    faults_injected: int
    lost: int
    duplicated: int
    recovery_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.extra.items())
        return (
            f"{self.fault}: jobs={self.jobs} faults={self.faults_injected} lost={self.lost} "
            f"duplicated={self.duplicated} recovery={recovery} {extra}".rstrip()
        )


@dataclass
class FigureBook:
    figures: list[Figure] = field(default_factory=list)

    def record(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"FIGURE {figure.line()}")  # also visible with -s, next to the test's own output
        return figure


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--figures-file", default=None, help="where to write reliability-figures.json")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BOOK] = FigureBook()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> FigureBook:
    return request.config.stash[_BOOK]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    book = config.stash.get(_BOOK, None)
    if book is None or not book.figures:
        return
    terminalreporter.section("reliability figures")
    for figure in book.figures:
        terminalreporter.write_line(figure.line())
    target = config.getoption("--figures-file")
    path = Path(target) if target else Path(config._tmp_path_factory.getbasetemp()) / "reliability-figures.json"  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(f) for f in book.figures], indent=2, default=str))
    terminalreporter.write_line(f"written to {path}")
