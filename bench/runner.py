"""Run benchmarks by name, write their results, and gather every target into one summary.

`genq bench` lands here. A benchmark that cannot run at all (a worker
that never starts) raises; a benchmark that runs but misses a target only says so in its report.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import Options, Table, machine, machine_line, num, targets_table

# In the order `all` runs them: cheap and self-contained first.
BENCHMARKS = ("throughput", "overhead", "failover", "lifecycle", "scale", "idle", "capacity", "fairshare", "prefix")


def run_one(name: str, options: Options) -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"bench.{name}")
    print(f"bench {name} ({options.size.value}) ...", file=sys.stderr, flush=True)
    report = module.run(options)
    json_path, md_path = report.write()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    data: dict[str, Any] = json.loads(json_path.read_text())
    return data


def run_many(names: Sequence[str], options: Options) -> int:
    """Run each benchmark in turn (one failing does not stop the others); 1 if any could not run."""
    done: list[dict[str, Any]] = []
    broken: list[str] = []
    for name in names:
        try:
            done.append(run_one(name, options))
        except Exception:
            traceback.print_exc()
            broken.append(name)
    if len(names) > 1:
        path = write_summary(done, broken, options.out_dir)
        print(path.read_text())
    return 1 if broken else 0


def write_summary(reports: Sequence[dict[str, Any]], broken: Sequence[str], out_dir: Path) -> Path:
    """Every target of every benchmark in one table, for the README's performance section."""
    rows = []
    for report in reports:
        for target in report["targets"]:
            rows.append({**target, "name": f"{report['benchmark']}: {target['name']}"})
    table: Table = targets_table(rows)
    table.title = "Every target"
    lines = [
        "## genq benchmarks: summary",
        "",
        f"Machine: {machine_line(machine())}.",
        "",
        table.markdown(),
        "",
        "Run: " + ", ".join(f"{r['benchmark']} ({r['size']}, {num(r['duration_s'], 0)} s)" for r in reports),
    ]
    if broken:
        lines += ["", "Could not run: " + ", ".join(broken)]
    path = out_dir / "summary.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
