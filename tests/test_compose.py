"""The deployment files, checked without a Docker engine or a Mac: docker-compose.yml parsed and
checked (services, ports, volumes, healthchecks, AOF), the files it mounts present, the launchd
plist and the systemd unit well-formed, and the TLS recipe of ops/README.md run for real against
a private redis-server."""

from __future__ import annotations

import configparser
import itertools
import json
import plistlib
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from jobcontract.connection import connect
from jobcontract.routes import Routes
from tests.metrics_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def seconds(duration: str) -> float:
    """A compose duration such as "20s", "1m30s"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * unit for n, unit in zip(parts.groups(), units.values(), strict=True) if n)


def flag_values(command: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in itertools.pairwise(command) if flag.startswith("--")}


def test_compose_has_every_service_with_a_healthcheck() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "prometheus", "grafana", "gateway", "genq-metrics", "llamacpp-worker"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    # No mlx worker in Docker: Metal is not reachable from a container.
    assert not any("mlx" in " ".join(map(str, s.get("command", []))) for s in services.values())


def test_redis_keeps_an_append_only_file_needs_a_password_and_offers_tls() -> None:
    redis_service = compose()["services"]["redis"]
    flags = flag_values(redis_service["command"])
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] in ("everysec", "always")
    assert flags["--requirepass"].startswith("${REDIS_PASSWORD")
    assert flags["--tls-port"] == "6380"
    assert {flags["--tls-cert-file"], flags["--tls-key-file"], flags["--tls-ca-cert-file"]} == {
        "/tls/redis.crt",
        "/tls/redis.key",
        "/tls/ca.crt",
    }
    assert redis_service["ports"] == ["6380:6380"], "only the TLS port leaves the host"
    volumes = redis_service["volumes"]
    assert "redis-data:/data" in volumes and "./ops/redis/tls:/tls:ro" in volumes
    assert "redis-data" in compose()["volumes"]


def test_genq_services_share_the_image_redis_and_routes() -> None:
    services = compose()["services"]
    for name in ("gateway", "genq-metrics", "llamacpp-worker"):
        service = services[name]
        assert service["image"] == "genq:latest" and service["build"] == "."
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        environment = service["environment"]
        assert environment["GENQ_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
        assert environment["GENQ_REDIS_URL"].endswith("@redis:6379/0")
        assert environment["GENQ_ROUTES_FILE"] == "/etc/genq/routes.toml"
        assert any(v.endswith(":/etc/genq/routes.toml:ro") for v in service["volumes"])
    gateway = services["gateway"]
    assert gateway["ports"] == ["8000:8000"]
    assert gateway["command"][:2] == ["genq", "gateway"]
    assert "GENQ_GATEWAY_API_KEYS" in gateway["environment"], "off loopback the gateway needs API keys"
    # Docker's SIGKILL comes after the gateway's own bounded shutdown, with room for the lifespan's end.
    grace_s = float(gateway["environment"]["GENQ_GATEWAY_SHUTDOWN_GRACE_S"])
    assert seconds(gateway["stop_grace_period"]) >= grace_s + 5
    assert services["genq-metrics"]["command"] == ["genq", "metrics", "--port", "9102"]
    worker = services["llamacpp-worker"]
    assert flag_values(worker["command"]) == {"--backend": "llamacpp", "--metrics-port": "9101"}
    assert worker["stop_grace_period"] == "60s"
    # The default routes file the compose mounts is a valid one.
    Routes.from_file(OPS / "routes.example.toml")


def test_prometheus_and_grafana_get_the_ops_files() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert "./ops/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"] == ["9090:9090"]
    grafana = services["grafana"]
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./ops/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["ports"] == ["3000:3000"]
    # What the mounts point at exists, and the provisioning finds the dashboard.
    datasource = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/genq.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert json.loads((OPS / "grafana/dashboards/genq.json").read_text())["uid"] == "genq-overview"
    # Prometheus scrapes what compose runs, on the ports compose gives them.
    targets = {p.stem: yaml.safe_load(p.read_text()) for p in (OPS / "prometheus/targets").glob("*.yml")}
    assert targets["cluster"][0]["targets"] == ["genq-metrics:9102"]
    assert targets["gateway"][0]["targets"] == ["gateway:8000"]
    config = yaml.safe_load((OPS / "prometheus/prometheus.yml").read_text())
    workers = next(job for job in config["scrape_configs"] if job["job_name"] == "genq-workers")
    assert workers["dns_sd_configs"][0] == {"names": ["llamacpp-worker"], "type": "A", "port": 9101}


def test_the_dockerfile_builds_what_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ops/build_llama_server.sh" in dockerfile
    assert "COPY --from=llama-server /opt/llama/bin/llama-server /usr/local/bin/llama-server" in dockerfile
    assert 'pip install --no-cache-dir ".[gateway]"' in dockerfile
    for package in ("genq", "jobcontract", "producer", "workers"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "USER genq" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "ops/redis/tls" in ignored  # no secrets or venv in the build context


def test_the_launchd_plist_starts_at_boot_restarts_and_logs_to_a_file() -> None:
    with (OPS / "launchd/com.genq.worker.plist").open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist["Label"] == "com.genq.worker"
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] and plist["StandardOutPath"].endswith(".log")
    assert plist["ProgramArguments"][1:] == ["worker", "--backend", "mlx", "--metrics-port", "9101"]
    environment = plist["EnvironmentVariables"]
    assert environment["GENQ_REDIS_URL"].startswith("rediss://")
    assert "ssl_ca_certs=" in environment["GENQ_REDIS_URL"]
    assert plist["ExitTimeOut"] > int(environment["GENQ_SHUTDOWN_GRACE_S"])
    assert plist["UserName"] != "root"


def test_the_systemd_unit_restarts_and_stops_gracefully() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(OPS / "systemd/genq-worker-llamacpp.service")
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == ["worker", "--backend", "llamacpp", "--metrics-port", "9101"]
    assert service["Restart"] == "always"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 30  # more than GENQ_SHUTDOWN_GRACE_S in the env file
    assert service["User"] == "genq"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    environment = dict(
        line.split("=", 1)
        for line in (OPS / "systemd/genq-worker.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert environment["GENQ_REDIS_URL"].startswith("rediss://")
    assert int(environment["GENQ_SHUTDOWN_GRACE_S"]) < int(service["TimeoutStopSec"])


def test_the_tls_recipe_gives_a_redis_that_genq_reaches_over_rediss(tmp_path: Path) -> None:
    """ops/redis/make-tls.sh, then Redis with the flags of docker-compose.yml, then genq's own
    connection with the URL of ops/README.md: a password and the CA are both needed."""
    certs = tmp_path / "tls"
    made = subprocess.run(
        [OPS / "redis/make-tls.sh", certs, "localhost", "127.0.0.1"], capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    flags = flag_values(compose()["services"]["redis"]["command"])
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(certs / "redis.crt"),
            "--tls-key-file",
            str(certs / "redis.key"),
            "--tls-ca-cert-file",
            str(certs / "ca.crt"),
            "--tls-auth-clients",
            flags["--tls-auth-clients"],
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://:s3cret@localhost:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
        deadline = time.monotonic() + 10
        while True:
            try:
                assert connect(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "TLS redis did not come up"
                time.sleep(0.1)
        failures = []
        for wrong in (
            f"rediss://:s3cret@localhost:{port}/0",
            f"rediss://:nope@localhost:{port}/0?ssl_ca_certs={certs / 'ca.crt'}",
        ):
            try:
                connect(wrong).ping()
            except (redis.ConnectionError, redis.AuthenticationError) as error:
                failures.append(type(error).__name__)
        assert failures == ["ConnectionError", "AuthenticationError"]  # no CA: refused; wrong password: refused
    finally:
        server.terminate()
        server.wait(timeout=10)
