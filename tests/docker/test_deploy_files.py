"""Checks of the deployment files under docker/ (no Docker engine needed).

* alerts.yml passes ``promtool check rules`` and its unit tests
  (docker/prometheus/alerts_test.yml, ``promtool test rules``); prometheus.yml
  passes ``promtool check config``. promtool comes with Debian's ``prometheus``
  package: without it these are skipped, except under CI (``CI`` set) where that
  is an error.
* The Grafana dashboard parses, every panel has a datasource and targets, every
  expression is valid PromQL (via promtool) and names only metrics that
  mailflow/metrics.py defines.
* compose.yaml: ``docker compose config`` (or Debian's ``docker-compose config``)
  when either is installed, and always a structural check in Python.
* The Dockerfile copies every package pyproject.toml builds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROM = DOCKER / "prometheus"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mailflow.json"
COMPOSE = DOCKER / "compose.yaml"

STAGES = ("ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "retry", "status")
# Stages that keep state on disk: RocksDB tables, deliver's delivery ledger.
STATEFUL = ("ratelimit", "store", "status", "deliver")
REPLICAS = {s: (2 if s == "deliver" else 1) for s in STAGES}


def tool(name: str) -> str:
    """Path of a required executable: skipped when absent, failed under CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian package: prometheus)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; required under CI")
        pytest.skip(msg)
    return path


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------ metric names


def exported_metric_names() -> set[str]:
    """Every sample name the collectors of mailflow.metrics expose."""
    from prometheus_client.metrics import MetricWrapperBase

    from mailflow import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "enum": ("",),
    }
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.update(family.name + s for s in suffixes[family.type])
    assert names, "no collectors found in mailflow.metrics"
    return names


_NOT_METRICS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions,
    keywords, labels, strings, durations or Grafana variables)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)  # Grafana variables
    idents = re.findall(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()", e)
    return {i for i in idents if i not in _NOT_METRICS}


def test_promql_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (stage, le) '
            '(rate(mailflow_stage_processing_seconds_bucket{stage=~"$stage"}[$__rate_interval])))'
            ' / on (stage) max by (stage) (mailflow_stage_lag offset 5m) and up')
    assert promql_metric_names(expr) == {
        "mailflow_stage_processing_seconds_bucket", "mailflow_stage_lag", "up"}


def test_exported_names_have_suffixes() -> None:
    names = exported_metric_names()
    assert "mailflow_stage_messages_total" in names
    assert "mailflow_stage_processing_seconds_bucket" in names
    assert "mailflow_stage_lag" in names
    assert "mailflow_stage_messages" not in names


# ------------------------------------------------------------- Prometheus


def alert_rules() -> list[dict]:
    doc = load_yaml(PROM / "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules() -> None:
    promtool = tool("promtool")
    out = run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    assert "SUCCESS" in out.stdout


def test_promtool_check_config(tmp_path: Path) -> None:
    """prometheus.yml names alerts.yml relative to itself: check a copy of both."""
    promtool = tool("promtool")
    shutil.copy(PROM / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_for_alerts() -> None:
    promtool = tool("promtool")
    out = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_unit_tests_cover_required_alerts() -> None:
    tested = {
        case["alertname"]
        for t in load_yaml(PROM / "alerts_test.yml")["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"MailflowStageNoConsumer", "MailflowScannerDown", "MailflowDeliveryLagGrowing"} <= tested


def test_alerts_have_annotations_and_known_metrics() -> None:
    known = exported_metric_names() | {"up"}
    rules = alert_rules()
    used: set[str] = set()
    for rule in rules:
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: unknown metrics {names - known}"
        used |= names
    # what the alerts are meant to watch
    for metric in ("mailflow_stage_lag", "mailflow_stage_oldest_waiting_seconds",
                   "mailflow_stage_messages_total", "mailflow_scanner_up",
                   "mailflow_stage_consumers", "mailflow_smtp_replies_total",
                   "mailflow_retries_total"):
        assert metric in used, metric
    lag = [r for r in rules if r["alert"] == "MailflowDeliveryLagGrowing"][0]
    assert "deriv(" in lag["expr"] and lag["for"] == "10m"


def test_prometheus_scrapes_every_stage_and_the_api() -> None:
    cfg = load_yaml(PROM / "prometheus.yml")
    assert cfg["rule_files"] == ["alerts.yml"]
    targets: dict[str, int] = {}
    for job in cfg["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            for name in sd["names"]:
                targets[name] = sd["port"]
    assert targets.get("api") == 8080
    for stage in STAGES:
        assert targets.get(stage) == 6066, stage


# ---------------------------------------------------------------- Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def test_dashboard_panels_have_datasource_and_targets() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["panels"]
    ds_doc = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uids = {d["uid"] for d in ds_doc["datasources"]}
    ids = set()
    for panel in doc["panels"]:
        title = panel.get("title")
        assert title, panel
        assert panel["id"] not in ids, title
        ids.add(panel["id"])
        assert panel.get("datasource", {}).get("uid") in uids, title
        assert panel.get("targets"), title
        for t in panel["targets"]:
            assert t.get("expr"), title
            assert t.get("refId"), title
            assert t.get("datasource", panel["datasource"]).get("uid") in uids, title
        assert set(panel["gridPos"]) >= {"x", "y", "w", "h"}, title


def test_dashboard_metrics_exist() -> None:
    known = exported_metric_names()
    used: set[str] = set()
    for title, expr in panel_exprs():
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= known, f"{title}: unknown metrics {names - known}"
        used |= names
    for metric in (
        "mailflow_stage_messages_total", "mailflow_stage_lag",
        "mailflow_stage_oldest_waiting_seconds", "mailflow_stage_processing_seconds_bucket",
        "mailflow_final_state_seconds_bucket", "mailflow_smtp_replies_total",
        "mailflow_retries_total", "mailflow_scan_verdicts_total", "mailflow_scan_seconds_bucket",
        "mailflow_api_requests_total",
    ):
        assert metric in used, metric


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, Grafana variables filled in, loads as a recording rule."""
    promtool = tool("promtool")
    rules = []
    for i, (_title, expr) in enumerate(panel_exprs()):
        e = expr.replace("$__rate_interval", "5m").replace("$stage", ".*")
        rules.append({"record": f"dashboard:panel_{i}", "expr": e})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)])


def test_grafana_provisioning_points_at_the_mounts() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mailflow.yml")["providers"][0]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    assert mounts.get(provider["options"]["path"]) == "./grafana/dashboards"
    assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning"
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- compose


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_cli() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed "
                    "(the structural checks below still run)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILFLOW_", "COMPOSE_"))}
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


def compose() -> dict:
    return load_yaml(COMPOSE)


def default_of(value: str) -> str:
    """``${VAR:-default}`` -> default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_kafka_three_kraft_nodes() -> None:
    services = compose()["services"]
    brokers = sorted(n for n, s in services.items() if "kafka" in default_of(s.get("image", "")))
    assert brokers == ["kafka-1", "kafka-2", "kafka-3"]
    node_ids, voters = set(), set()
    for name in brokers:
        svc = services[name]
        assert re.fullmatch(r"apache/kafka:4\.1(\.\d+)?", default_of(svc["image"])), svc["image"]
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert default_of(env["CLUSTER_ID"])
        node_ids.add(env["KAFKA_NODE_ID"])
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        assert any(v.endswith(":/var/lib/kafka/data") for v in svc["volumes"])
    assert node_ids == {"1", "2", "3"}
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}


def test_compose_stage_services() -> None:
    doc = compose()
    services, volumes = doc["services"], doc["volumes"]
    for stage in STAGES:
        svc = services.get(stage)
        assert svc is not None, f"no service for stage {stage}"
        assert svc["command"] == ["worker", "--stages", stage]
        assert svc["deploy"]["replicas"] == REPLICAS[stage], stage
        assert "ports" not in svc, f"{stage}: published ports would stop --scale"
        named = {v.split(":")[0]: v.split(":")[1] for v in svc.get("volumes", [])
                 if not v.startswith((".", "/"))}
        for vol in named:
            assert vol in volumes, f"{stage}: volume {vol} not declared"
        if stage in STATEFUL:
            assert "/var/lib/mailflow/stages" in named.values(), f"{stage}: no volume for its state"
        env = svc["environment"]
        assert env["MAILFLOW_REPLICATION"] == "3"
        assert env["MAILFLOW_API_HOST"] == "0.0.0.0"
        assert sorted(env["MAILFLOW_KAFKA_BOOTSTRAP"].split(",")) == [
            "kafka-1:9092", "kafka-2:9092", "kafka-3:9092"]
        assert env["MAILFLOW_CLAMD"] == "clamd:3310"
        assert env["MAILFLOW_RSPAMD"] == "http://rspamd:11333"
        store = env["MAILFLOW_OBJECT_STORE"]
        assert store.startswith(("file://", "s3://"))
        if store.startswith("file://"):
            # a file store must be one volume every process shares
            assert named.get("objects") == store.removeprefix("file://"), stage


def test_compose_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's and every stage's environment, defaults filled in, parses as Settings."""
    from mailflow.config import Settings

    services = compose()["services"]
    for name in ("api", *STAGES):
        for key in [k for k in os.environ if k.startswith("MAILFLOW_")]:
            monkeypatch.delenv(key)
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, default_of(str(value)))
        s = Settings.from_env()
        assert s.replication == 3 and s.partitions >= REPLICAS["deliver"], name
        assert s.api_host == "0.0.0.0" and str(s.data_dir) == "/var/lib/mailflow", name
        assert len(s.kafka_bootstrap.split(",")) == 3, name


def test_compose_api_and_companions() -> None:
    services = compose()["services"]
    api = services["api"]
    assert api["command"] == ["api"]
    assert any(str(p).endswith(":8080") for p in api["ports"])
    assert default_of(services["clamd"]["image"]).startswith("clamav/clamav")
    assert default_of(services["rspamd"]["image"]).startswith("rspamd/rspamd")
    assert default_of(services["prometheus"]["image"]).startswith("prom/prometheus")
    assert default_of(services["grafana"]["image"]).startswith("grafana/grafana")
    prom_mounts = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= prom_mounts
    # every bind mount names a file or directory of the repository
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: {src} missing"
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_copies_every_package() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}\s*$", text, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r'^ENTRYPOINT \["mailflow"\]\s*$', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), "the image must not run as root"
    copied = set(re.findall(r"^COPY (\w+) \./\1\s*$", text, re.M))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*").split(".")[0]
        assert top in copied, f"Dockerfile does not COPY package {top}"
        assert (ROOT / top).is_dir(), top


# ------------------------------------------------- compose vs the local cluster

# The broker settings whose values decide what a node's loss costs: replication,
# in-sync replicas, leader election, failover timing, the listeners' names. The
# cluster chaos run (tests/pipeline/test_cluster.py) runs devtools/broker.py's
# cluster with these; production runs compose.yaml's. They must be the same.
FAILOVER_KEYS = (
    "process.roles", "default.replication.factor", "min.insync.replicas",
    "offsets.topic.replication.factor", "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr", "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr", "unclean.leader.election.enable",
    "broker.session.timeout.ms", "broker.heartbeat.interval.ms",
    "leader.imbalance.check.interval.seconds", "controller.listener.names",
    "inter.broker.listener.name", "listener.security.protocol.map",
)


def kafka_env_name(key: str) -> str:
    """The apache/kafka image's environment name for a server property."""
    return "KAFKA_" + key.upper().replace(".", "_")


def test_compose_kafka_matches_the_tested_cluster(tmp_path: Path) -> None:
    from devtools import broker

    voters = broker.cluster_nodes(3)
    services = compose()["services"]
    for node in voters:
        tested = dict(line.split("=", 1) for line in broker.server_properties(
            tmp_path, node.port, node.controller_port, node=node, voters=voters).splitlines()
            if "=" in line)
        env = {k: default_of(str(v)) for k, v in services[f"kafka-{node.node_id}"]["environment"].items()}
        for key in FAILOVER_KEYS:
            assert env.get(kafka_env_name(key)) == tested[key], (node.node_id, key)
        assert env["KAFKA_NODE_ID"] == tested["node.id"]
        # Same listeners and voters; hosts differ (loopback ports vs container names).
        def shape(value: str) -> list[str]:
            return sorted(re.sub(r"//[^:]*:", "//:", p).split(":")[0] for p in value.split(","))
        assert shape(env["KAFKA_LISTENERS"]) == shape(tested["listeners"])
        assert env["KAFKA_LISTENERS"].endswith(f":{broker.cluster_nodes(1)[0].controller_port}")
        assert [v.split("@")[0] for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")] == [
            v.split("@")[0] for v in tested["controller.quorum.voters"].split(",")]
    # And mailflow's side: the replication its topics get on the tested cluster.
    mf = services["api"]["environment"]
    assert mf["MAILFLOW_REPLICATION"] == tested["default.replication.factor"]


def test_docker_readme_states_the_replication_and_failover_settings() -> None:
    from devtools import broker

    text = (DOCKER / "README.md").read_text()
    for phrase in ("replication factor 3", "`min.insync.replicas=2`",
                   f"`broker.session.timeout.ms={broker.BROKER_SESSION_MS}`", "acks=all",
                   "bench/chaos.py --brokers 3"):
        assert phrase in text, phrase
