"""How benchmarks report: sizes and options, percentiles, the machine they ran on, and one format
(JSON for tools, Markdown for people) written to bench/results/. A target that is missed is said
so in the report; nothing here ever fails a run on a time."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import psutil

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results"

T = TypeVar("T")


class Size(StrEnum):
    """How much each benchmark does. `ci` keeps the scripts working in the test suite (seconds
    each); `small` is the committed run (a few minutes for all on 2 cores); `full` is for a quiet
    machine and tighter percentiles."""

    CI = "ci"
    SMALL = "small"
    FULL = "full"


@dataclass(frozen=True)
class Options:
    size: Size = Size.SMALL
    out_dir: Path = DEFAULT_RESULTS
    models_dir: Path | None = None  # GENQ_MODELS_DIR (~/.cache/genq/models) when None
    llama_server: str | None = None  # a llama-server binary for the failover benchmark
    keep_logs: bool = False


def pick(size: Size, ci: T, small: T, full: T) -> T:
    return {Size.CI: ci, Size.SMALL: small, Size.FULL: full}[size]


# -- statistics ------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Seconds in, a summary in milliseconds out: what every latency table shows."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "min_ms": min(ms, default=math.nan),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=math.nan),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
    }


def num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


# -- the machine -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def redis_server_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or None


def llama_server_version(binary: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, Any]:
    return {
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("mlx", "mlx-lm", "llama_cpp_python", "dramatiq", "redis", "httpx", "pydantic")
        },
        "redis_server": redis_server_version(),
    }


def machine_line(info: Mapping[str, Any]) -> str:
    packages = info.get("packages", {})
    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v and k in ("mlx", "mlx-lm", "llama_cpp_python"))
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, {info['os']}; "
        f"Python {info['python']}; {versions}; redis-server {info.get('redis_server')}"
    )


# -- reports ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    goal: str
    measured: float | None
    unit: str
    met: bool | None  # None: not measured this run

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "**missed**")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("| " + " | ".join("---" for _ in self.columns) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Report:
    """One benchmark's output. Numbers go to `results` (JSON); people read `tables` and `targets`."""

    name: str
    title: str
    options: Options
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)

    def target(self, name: str, goal: str, measured: float | None, unit: str, ok: Callable[[float], bool]) -> Target:
        if measured is None or math.isnan(measured):
            target = Target(name, goal, None, unit, None)
        else:
            target = Target(name, goal, measured, unit, ok(measured))
        self.targets.append(target)
        return target

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        self.tables.append(Table(title, columns, rows))

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "size": self.options.size.value,
            "started_at": self.started_at,
            "duration_s": round(time.monotonic() - self.started, 2),
            "load_avg_before": list(self.load_before),
            "load_avg_after": list(os.getloadavg()),
            "machine": machine(),
            "params": self.params,
            "results": self.results,
            "targets": [
                {"name": t.name, "goal": t.goal, "measured": t.measured, "unit": t.unit, "met": t.met}
                for t in self.targets
            ],
            "notes": self.notes,
        }

    def write(self) -> tuple[Path, Path]:
        data = self.to_json()
        self.options.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.options.out_dir / f"{self.name}.json"
        md_path = self.options.out_dir / f"{self.name}.md"
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        md_path.write_text(render_markdown(data, self.tables))
        return json_path, md_path


def targets_table(targets: Sequence[Mapping[str, Any]]) -> Table:
    rows = []
    for t in targets:
        met = t["met"]
        verdict = "not measured" if met is None else ("met" if met else "**missed**")
        rows.append([t["name"], t["goal"], f"{num(t['measured'], 2)} {t['unit']}".strip(), verdict])
    return Table("Targets", ["target", "goal", "measured", "verdict"], rows)


def render_markdown(data: Mapping[str, Any], tables: Sequence[Table]) -> str:
    load = data["load_avg_before"]
    parts = [
        f"## {data['title']}",
        "",
        f"Size `{data['size']}`, run {data['started_at']} in {data['duration_s']:.0f} s, "
        f"load average {load[0]:.2f} before and {data['load_avg_after'][0]:.2f} after.  ",
        f"Machine: {machine_line(data['machine'])}.",
        "",
    ]
    for table in tables:
        parts += [table.markdown(), ""]
    if data["targets"]:
        parts += [targets_table(data["targets"]).markdown(), ""]
    if data["notes"]:
        parts += ["Notes:", "", *(f"- {n}" for n in data["notes"]), ""]
    return "\n".join(parts)
