"""The ops/ files against a real Prometheus (Debian's `prometheus` package): it scrapes a running
genq on loopback with ops/prometheus/prometheus.yml (only the intervals shortened and the targets
pointed at this test's ports), and every PromQL expression of the Grafana dashboard and of the
alert rules is evaluated through its HTTP API after a few jobs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from genq import processes
from genq.local_redis import LocalRedis
from genq.processes import spawn
from genq.worker_env import worker_env
from jobcontract.settings import GenqSettings
from producer.client import Client
from tests.harness import start_worker, wait_until
from tests.metrics_helpers import free_port, gateway_app, serving

OPS = Path(__file__).resolve().parents[1] / "ops"
PROMETHEUS_DIR = OPS / "prometheus"
DASHBOARD = OPS / "grafana" / "dashboards" / "genq.json"
# What Grafana substitutes before it sends a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$__interval": "15s",
    "$model": ".+",
    "$tenant": ".+",
}
SHARED_INSTRUCTION = "Answer in one word whether the line below is a question or a statement. " * 4
# An alert is `<signal> <comparison> <threshold>`; the signal must return data, the whole must parse.
ALERT_SHAPE = re.compile(r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e-?[0-9]+)?)$", re.S)


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: apt-get install prometheus (.ci/run does)"
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_rules_and_the_alerts_fire_when_they_should() -> None:
    config = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", PROMETHEUS_DIR / "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 11 rules found" in rules.stdout
    # alerts_test.yml: each alert fires on the series that should fire it, with its text.
    unit = promtool("test", "rules", PROMETHEUS_DIR / "alerts_test.yml")
    assert unit.returncode == 0, unit.stdout + unit.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def grafana(expr: str) -> str:
    for variable, substitute in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, substitute)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        return httpx.get(f"{self.url}/api/v1/{path}", timeout=10).json()["data"]


def write_config(directory: Path, targets: dict[str, list[str]]) -> Path:
    """ops/prometheus/ as it is, with 1 s intervals and this test's loopback targets."""
    shutil.copytree(PROMETHEUS_DIR, directory, dirs_exist_ok=True)
    config = yaml.safe_load((directory / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    for name, addresses in targets.items():
        (directory / "targets" / f"{name}.yml").write_text(yaml.safe_dump([{"targets": addresses}]))
    return directory / "prometheus.yml"


@pytest.fixture(scope="module")
def stack(redis_server: LocalRedis, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A worker, `genq metrics`, the gateway, and Prometheus scraping all three."""
    directory = tmp_path_factory.mktemp("prometheus")
    settings = GenqSettings(redis_url=redis_server.url, namespace=f"tp{os.getpid()}", models_dir=models_dir)
    worker_port, cluster_port, gateway_port, prometheus_port = (free_port() for _ in range(4))
    # Each process is stopped on the way out, whatever step fails (a missing promtool included).
    with ExitStack() as started:
        # A multi-model worker (serving the one model): it exports the Models row's budget and loads too.
        worker = start_worker(
            settings,
            directory,
            processes=1,
            concurrency=4,
            wait=False,
            extra_args=["--metrics-port", str(worker_port), "--models", "tiny", "--memory-budget-gb", "2"],
        )
        started.callback(worker.stop)
        cluster = spawn(
            [sys.executable, "-m", "genq", "metrics", "--host", "127.0.0.1", "--port", str(cluster_port)],
            env=worker_env(settings),
            log_path=directory / "genq-metrics.log",
        )
        started.callback(processes.stop, cluster, timeout_s=30)
        config = write_config(
            directory / "config",
            {
                "workers": [f"127.0.0.1:{worker_port}"],
                "cluster": [f"127.0.0.1:{cluster_port}"],
                "gateway": [f"127.0.0.1:{gateway_port}"],
            },
        )
        checked = promtool("check", "config", config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = directory / "prometheus.log"
        gateway_url = started.enter_context(serving(gateway_app(settings), gateway_port))
        prometheus = spawn(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            env=os.environ,
            log_path=log,
        )
        started.callback(processes.stop, prometheus, timeout_s=30)
        handle = Prometheus(f"http://127.0.0.1:{prometheus_port}", prometheus, log)
        worker.wait_ready(servers=False)  # its model loads with the first job
        assert wait_until(lambda: _ready(handle), 60), log.read_text()
        assert wait_until(lambda: _all_targets_up(handle), 60), handle.api("targets")
        _traffic(settings, gateway_url)
        yield handle


def _ready(prometheus: Prometheus) -> bool:
    try:
        return httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        assert prometheus.process.poll() is None, prometheus.log.read_text()
        return False


def _all_targets_up(prometheus: Prometheus) -> bool:
    targets = prometheus.api("targets")["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
    return jobs == {"genq-workers", "genq-cluster", "genq-gateway"} and all(t["health"] == "up" for t in targets)


def _traffic(settings: GenqSettings, gateway_url: str) -> None:
    """A few waves of jobs and requests, a second apart, so rates span several scrapes."""
    with Client(settings) as client, httpx.Client(base_url=gateway_url) as http:
        for wave in range(4):
            # Half streamed: only a streamed job feeds the time-to-first-token and inter-token panels.
            jobs = [
                {"model": "tiny", "prompt": f"wave {wave} job {n}", "max_tokens": 8, "stream": n % 2 == 0}
                for n in range(4)
            ]
            # One job a wave opens with a long shared instruction: from the second wave on, the server
            # takes it from its prompt cache, which the prompt cache panels show.
            jobs.append({"model": "tiny", "prompt": f"{SHARED_INSTRUCTION}\nwave {wave}", "max_tokens": 4})
            results = client.results(client.submit_many(jobs), timeout=60)
            assert all(r.ok for r in results), [r.error for r in results]
            completion = http.post("/v1/completions", json={"model": "tiny", "prompt": f"wave {wave}", "max_tokens": 4})
            assert completion.status_code == 200, completion.text
            assert http.get(f"/v1/genq/jobs/missing{wave}").status_code == 404
            time.sleep(1.2)
        failed = client.generate({"model": "tiny", "prompt": "too late", "max_tokens": 4, "timeout_s": 1e-6}, 60)
        assert not failed.ok
    time.sleep(3)  # a few more scrapes and rule evaluations after the last job


def test_every_dashboard_query_returns_data(stack: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty, meaningless = [], []
    for name, expr in queries:
        result = stack.query(grafana(expr))
        if not result:
            empty.append(name)
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            meaningless.append(name)
    assert not empty, f"no data for {empty}"
    assert not meaningless, f"only NaN for {meaningless}"


def test_the_prompt_cache_hit_ratio_panel_shows_the_shared_instruction_served_from_cache(stack: Prometheus) -> None:
    panel = next(
        p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == "Prompt cache hit ratio per pool"
    )
    [target] = panel["targets"]
    [pool] = stack.query(grafana(target["expr"]))
    assert pool["metric"] == {"model": "tiny", "backend": "mlx"}
    assert 0 < float(pool["value"][1]) < 1


def test_the_dashboard_model_variable_lists_the_model(stack: Prometheus) -> None:
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "model")
    metric = re.fullmatch(r"label_values\((\w+), model\)", variable["definition"])
    assert metric is not None
    values = httpx.get(f"{stack.url}/api/v1/label/model/values", params={"match[]": metric.group(1)}).json()["data"]
    assert values == ["tiny"]


def test_the_dashboard_tenant_variable_lists_the_tenants(stack: Prometheus) -> None:
    """A gateway without API keys serves one tenant, `default`; the worker counts the Python client's
    jobs under it too, so the panels filtered by the variable show them."""
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "tenant")
    metric = re.fullmatch(r"label_values\((\w+), tenant\)", variable["definition"])
    assert metric is not None
    values = httpx.get(f"{stack.url}/api/v1/label/tenant/values", params={"match[]": metric.group(1)}).json()["data"]
    assert "default" in values and set(values) <= {"default", "none"}, values
    jobs = stack.query('sum by (tenant) (genq_jobs_total{outcome="succeeded"})')
    assert {r["metric"]["tenant"] for r in jobs} == {"default"}


def test_every_alert_parses_and_its_signal_returns_data(stack: Prometheus) -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "GenqNoWorkerReady",
        "GenqDeadLettersGrowing",
        "GenqTimeToFirstTokenHigh",
        "GenqInteractiveJobWaitingTooLong",
        "GenqRerouteRateHigh",
        "GenqModelSwapThrash",
    }
    for rule in rules:
        assert rule.get("for") and rule["annotations"].get("summary") and rule["annotations"].get("runbook"), rule
        shape = ALERT_SHAPE.match(rule["expr"].strip())
        assert shape is not None, f"{rule['alert']}: not `<signal> <op> <threshold>`"
        stack.query(rule["expr"])  # parses and evaluates (firing or not)
        assert stack.query(shape["signal"]), f"{rule['alert']}: its signal {shape['signal']!r} returns no data"
    # Prometheus itself evaluates the rules file every second: no rule may fail to evaluate.
    evaluated = [r for g in stack.api("rules")["groups"] for r in g["rules"]]
    assert len(evaluated) == len(rules)
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    # With a worker ready and nothing failing, nothing critical fires.
    firing = {a["labels"]["alertname"] for a in stack.api("alerts")["alerts"] if a["state"] == "firing"}
    assert not firing & {"GenqNoWorkerReady", "GenqRedisUnreachable", "GenqTargetDown"}
