"""deploy/: the Prometheus rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``), and every metric the rules and the Grafana dashboard use is one
that shunter exports, so a renamed metric cannot leave an alert silently dead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shunter.observe.admin import instance_gauges
from shunter.observe.collector import StatsCollector
from shunter.observe.lag import caller_families, partition_families
from shunter.observe.stats import Stats
from shunter.observe.status import CallerStatus, PartitionStatus
from shunter.outcome import Failed
from shunter.testing import make_message

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/alerts_test.yml"
GRAFANA = ROOT / "deploy/grafana/shunter.json"
METRIC = re.compile(r"\b((?:shunter|kafka_consumergroup|kafka_partition)_[a-z_]+)\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs this")
    return found


def test_rules_pass_promtool_check() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def test_alerts_fire_on_their_unit_tests() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def exported_names() -> set[str]:
    """Every sample name /metrics writes, from the collectors fed one row of each kind."""
    stats = Stats({"medal": "revenue"})
    stats.delivered("gift", "medal", 0.01)
    stats.failed("gift", "medal", 0.01, "dlq")
    stats.accepted("gift")
    stats.written("dlq")
    msg = make_message({}, topic="gift", caller="medal")
    stats.fingerprints.observe("medal", Failed("KeyError", "x", ""), msg._record)
    row = PartitionStatus("gift", 0, "source", 1, 1, 2, 1, 0, 0.0, 0.0, "", False)
    caller = CallerStatus("medal", "revenue", False, 0, 0, 0.0)
    stats.gauges.append(lambda: partition_families("g", [row]))
    stats.gauges.append(lambda: caller_families([caller], set()))
    stats.gauges.append(instance_gauges(0.0, ""))
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def used_names() -> dict[str, set[str]]:
    grafana = orjson.loads(GRAFANA.read_bytes())
    exprs = [t["expr"] for p in grafana["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in grafana["templating"]["list"] if "definition" in v]
    rules = RULES.read_text()
    rule_exprs = [line for line in rules.splitlines() if line.strip().startswith("expr:")]
    return {
        "grafana": {m for e in exprs for m in METRIC.findall(e)},
        "alerts": {m for e in rule_exprs for m in METRIC.findall(e)},
    }


def test_every_metric_in_deploy_is_exported() -> None:
    exported = exported_names()
    for where, names in used_names().items():
        assert names, where
        missing = names - exported
        assert not missing, f"{where} uses metrics shunter does not export: {sorted(missing)}"


def test_grafana_dashboard_is_importable() -> None:
    grafana = orjson.loads(GRAFANA.read_bytes())
    assert grafana["uid"] and grafana["title"] == "shunter"
    ids = [p["id"] for p in grafana["panels"]]
    assert len(ids) == len(set(ids))
    for panel in grafana["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
