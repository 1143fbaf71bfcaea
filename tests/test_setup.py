"""The README's two commands set up a fresh machine themselves, and `.ci/run` only calls the test one.

The set-up is checked without touching this machine: `make -n` shows what each command would run,
and ops/bootstrap.sh runs for real with a PATH that lacks the programs and whose `apt-get`,
`systemctl`, `service` and `update-rc.d` only write down how they were called."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make") or "make"
BASH = shutil.which("bash") or "/bin/bash"


def dry_run(target: str, venv: Path) -> str:
    # Run as a top-level make: under `make test` the inherited MAKELEVEL/MAKEFLAGS would add
    # "Entering directory" lines and pass the outer make's options down.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    done = subprocess.run(
        [MAKE, "-n", target, f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_make_demo_installs_only_what_the_demo_runs(tmp_path: Path) -> None:
    plan = dry_run("demo", tmp_path / "venv")
    assert "ops/bootstrap.sh system demo" in plan
    assert "ops/bootstrap.sh python tinymodel,mlx" in plan
    assert "llamacpp" not in plan and "llama-server" not in plan and "dev" not in plan
    assert plan.rstrip().endswith("genq demo")


def test_make_test_adds_the_rest_to_the_same_venv_once_the_demo_ran(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    plan = dry_run("test", venv)
    assert "ops/bootstrap.sh system test" in plan
    assert "ops/bootstrap.sh python dev,tinymodel,mlx,llamacpp,gateway" in plan
    assert "build_llama_server.sh" in plan and "pytest" in plan
    # After the demo's set-up, the demo installs nothing again; the test set-up still does its own.
    venv.mkdir()
    (venv / ".genq-tinymodel-mlx").touch()
    assert "bootstrap.sh python" not in dry_run("demo", venv)
    assert "bootstrap.sh python dev,tinymodel,mlx,llamacpp,gateway" in dry_run("test", venv)
    (venv / ".genq-dev-tinymodel-mlx-llamacpp-gateway").touch()
    assert "bootstrap.sh python" not in dry_run("test", venv)


def test_ci_only_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci/run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "exec make test" in commands
    assert not any(word in script for word in ("apt-get", "pip ", "brew "))
    assert "make test" in (ROOT / "README.md").read_text()


def fake_debian(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH with the shell tools bootstrap.sh uses, none of the programs it installs, root's `id`,
    and package and service commands that only record their arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("dirname", "uname", "sort", "sed", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    for recorder in ("apt-get", "systemctl", "service", "update-rc.d"):
        (bin_dir / recorder).write_text(f'#!/bin/sh\necho "{recorder} $*" >> {calls}\n')
    for path in bin_dir.iterdir():
        if not path.is_symlink():
            path.chmod(0o755)
    return bin_dir, calls


def bootstrap(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(ROOT / "ops/bootstrap.sh"), *args],
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_test_setup_installs_redis_sentinel_and_prometheus_and_stops_their_services(tmp_path: Path) -> None:
    bin_dir, calls = fake_debian(tmp_path)
    done = bootstrap(bin_dir, "system", "test")
    assert done.returncode == 0, done.stderr
    recorded = calls.read_text().splitlines()
    [install] = [line for line in recorded if line.startswith("apt-get") and " install " in line]
    assert set(install.split()) >= {"redis-server", "redis-sentinel", "prometheus"}
    assert "systemctl disable --now prometheus" in recorded
    assert "systemctl disable --now redis-sentinel" in recorded
    assert not any("redis-server" in line for line in recorded if not line.startswith("apt-get"))


def test_the_demo_setup_installs_only_redis_server(tmp_path: Path) -> None:
    bin_dir, calls = fake_debian(tmp_path)
    done = bootstrap(bin_dir, "system", "demo")
    assert done.returncode == 0, done.stderr
    [install] = [line for line in calls.read_text().splitlines() if " install " in line]
    assert install.split()[-1] == "redis-server" and "prometheus" not in install
