"""The benchmarks keep working: `genq bench all --size ci` runs every script once on real workers
and servers (a private Redis of its own), and each writes well-formed JSON and Markdown with the
fields the README's performance section is built from. Times are reported, never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = ("throughput", "overhead", "failover", "lifecycle", "scale", "idle", "capacity", "fairshare", "prefix")


@pytest.fixture(scope="module")
def bench_run(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "genq",
            "bench",
            "all",
            "--size",
            "ci",
            "--out",
            str(out),
            "--models-dir",
            str(models_dir),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, done


def load(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return data


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_every_benchmark_ran(bench_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = bench_run
    assert done.returncode == 0, done.stderr[-5000:]
    summary = (out / "summary.md").read_text()
    for name in BENCHMARKS:
        assert (out / f"{name}.json").exists() and (out / f"{name}.md").exists(), name
        assert f"{name}: " in summary
    assert "Could not run" not in summary


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_report_is_well_formed(bench_run: tuple[Path, subprocess.CompletedProcess[str]], name: str) -> None:
    out, _ = bench_run
    data = load(out, name)
    assert data["benchmark"] == name and data["size"] == "ci"
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"] and data["machine"]["python"]
    assert data["duration_s"] > 0 and len(data["load_avg_before"]) == 3
    assert data["targets"], "every benchmark states its targets"
    for target in data["targets"]:
        assert set(target) == {"name", "goal", "measured", "unit", "met"}
        assert finite(target["measured"]) and isinstance(target["met"], bool), target
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith(f"## {data['title']}")
    assert "| target | goal | measured | verdict |" in markdown
    assert markdown.count("\n| ") >= 2 + len(data["targets"])


def test_throughput_compares_genq_with_direct_calls(bench_run: tuple[Path, Any]) -> None:
    levels = load(bench_run[0], "throughput")["results"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 8]
    for level in levels:
        for side in ("direct", "genq"):
            assert level[side]["jobs"] > 0 and level[side]["tokens"] > 0 and level[side]["tokens_per_s"] > 0
        assert level["ratio"] == pytest.approx(level["genq"]["tokens_per_s"] / level["direct"]["tokens_per_s"])


def test_overhead_has_genq_and_plain_dramatiq_idle_and_busy(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "overhead")["results"]
    for mode in ("idle", "busy"):
        genq = results["genq"][mode]
        for part in ("overhead", "e2e", "backend_call", "direct", "queue_wait", "gateway", "gateway_overhead"):
            assert genq[part]["n"] > 0 and finite(genq[part]["p50_ms"]), (mode, part)
        # What genq adds is what is left of its latency once the backend call is taken out.
        assert genq["overhead"]["p50_ms"] < genq["e2e"]["p50_ms"]
        assert genq["gateway"]["n"] == genq["e2e"]["n"] == genq["direct"]["n"], mode
        assert results["dramatiq"][mode]["e2e"]["n"] > 0
    assert results["genq"]["background_jobs_done"] > 0 and results["dramatiq"]["background_jobs_done"] > 0


def test_failover_moves_every_job_from_the_frozen_server_to_llama_cpp(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "failover")["results"]
    assert results["failed_over"] == len(results["samples"]) > 0
    for sample in results["samples"]:
        assert [a["backend"] for a in sample["attempts"]] == ["mlx", "llamacpp"]
        assert sample["attempts"][0]["outcome"] == "timeout"
        parts = sample["detection_s"] + sample["handoff_s"] + sample["llama_ttft_s"]
        assert sample["failover_s"] == pytest.approx(parts, abs=1e-3)


def test_lifecycle_times_starts_crashes_and_memory(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "lifecycle")["results"]
    assert results["genq"][0]["first_result_s"] > 0 and results["bare"][0]["first_completion_s"] > 0
    assert results["crash"]["serving_again_s"]["n"] >= 1
    names = {t["name"] for t in load(bench_run[0], "lifecycle")["targets"]}
    assert "worker start to ready, beyond the bare server's: its first run" in names
    assert results["memory"]["genq_mb"] > 0 and results["memory"]["servers_mb"] > 0


def test_scale_reports_producer_memory_redis_per_job_and_processes(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "scale")["results"]
    batch = results["batch"]
    assert batch["jobs"] == load(bench_run[0], "scale")["params"]["batch_lines"]
    assert batch["peak_rss_mb"] > 0 and batch["redis_bytes_per_job"] > 0
    assert [level["processes"] for level in results["throughput"]] == [1, 2]
    assert all(level["jobs_per_s"] > 0 for level in results["throughput"])
    assert results["throughput"][1]["processes_that_served"] == 2


def test_fairshare_reports_each_tenant_alone_and_together(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "fairshare")["results"]
    for run in ("fair", "fcfs"):
        assert set(results[run]) == {"A", "B"} and all(finite(v) and v > 0 for v in results[run].values())
    assert finite(results["b_alone"]["B"]) and finite(results["a_alone"]["A"])


def test_prefix_reports_both_sides_of_placement(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "prefix")["results"]
    for side in ("affinity_on", "affinity_off"):
        run = results[side]
        assert run["jobs"] > 0 and run["prompt_tokens"] > 0 and finite(run["wall_s"]) and run["wall_s"] > 0
        assert 0 <= run["cached_tokens"] <= run["prompt_tokens"] and 0 <= run["cached_share"] <= 1
        assert sum(run["jobs_per_worker"].values()) == run["jobs"], "every job names the worker that ran it"
        assert set(run["prefixes_per_worker"]) == set(run["jobs_per_worker"]) == set(run["idle_before_end_s"])
        assert run["spread"] >= 1 and finite(run["completion_tokens_per_s"]) and finite(run["prompt_tokens_per_s"])
        assert run["ttft_after_start_ms"]["n"] == run["jobs"]
    # The batch shares 16 instructions: with placement on, the servers serve some of each from cache.
    assert results["affinity_on"]["cached_tokens"] > 0


def test_idle_reports_cpu_and_commands_by_process(bench_run: tuple[Path, Any]) -> None:
    results = load(bench_run[0], "idle")["results"]
    assert set(results["cpu_ms_per_s"]) == {"supervisor", "worker process", "server", "redis-server"}
    assert all(finite(v) and v >= 0 for v in results["cpu_ms_per_s"].values())
    # An idle worker still vouches (every TTL/4, 2.5 s): MONITOR names who sent what. Its consumers may
    # send nothing in a short window: an idle one waits 10 s in one read.
    assert results["redis_commands_per_s"] > 0
    assert set(results["commands_per_s_by_process"]) <= {"supervisor", "worker process"}
    assert any("vouch" in c for c in results["commands_per_s_by_process"].get("supervisor", {}))


def test_capacity_compares_three_paths_with_cpu_by_process(bench_run: tuple[Path, Any]) -> None:
    data = load(bench_run[0], "capacity")
    blocks, summary = data["results"]["blocks"], data["results"]["summary"]
    rounds = data["params"]["rounds"]
    assert len(blocks) == rounds * 2 * 3
    for size in ("4", "64"):
        for path in ("direct", "client", "gateway"):
            entry = summary[size][path]
            assert entry["jobs_per_s"] > 0 and entry["tokens_per_job"] > 0, (size, path)
            assert set(entry["cpu_ms_per_job"]) == {"caller", "gateway", "genq worker", "redis-server", "llama-server"}
        # A direct call never touches genq; the other paths do.
        assert summary[size]["direct"]["genq_cpu_ms_per_job"] is None
        assert summary[size]["client"]["genq_cpu_ms_per_job"] >= 0
        if rounds == 1:  # one round: the ratio is that round's own
            for path in ("client", "gateway"):
                expected = summary[size][path]["jobs_per_s"] / summary[size]["direct"]["jobs_per_s"]
                assert summary[size][path]["ratio"] == pytest.approx(expected)
