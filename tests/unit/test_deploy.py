"""The deployment examples can be checked here without systemd running or Docker: the
systemd unit is verified by `systemd-analyze verify` when it is installed and parsed
either way; the container recipe is parsed, its entrypoint is the built-in supervisor,
its health check asks the admin API's own health path on the configured port, and its
configuration is the example's but for the keys a container must change."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shunter.cli.main import main
from shunter.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "shunter.service"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
CONTAINER_YAML = ROOT / "deploy" / "container" / "shunter.yaml"
EXAMPLE = ROOT / "examples" / "live-revenue"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_the_built_in_supervisor_and_stops_it_gracefully() -> None:
    service = unit()["Service"]
    start = service["ExecStart"].split()
    assert start[1:] == ["run", "-c", "/etc/shunter/shunter.yaml"]  # supervised: no --no-supervise
    assert service["ExecStartPre"].split()[1:3] == ["check", "-c"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the supervisor only; it forwards
    drain = load_config(EXAMPLE / "shunter.yaml").kafka.drain_timeout
    assert int(service["TimeoutStopSec"]) > drain + 30
    assert service["Restart"] == "on-failure"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """(The unit names /opt/shunter/bin/shunter; verify needs an executable there, so the
    copy verified names this environment's shunter instead.)"""
    shunter = Path(sys.executable).with_name("shunter")
    if not shunter.exists():
        shunter = Path(shutil.which("true") or "/bin/true")
    copy = tmp_path / "shunter.service"
    copy.write_text(UNIT.read_text().replace("/opt/shunter/bin/shunter", str(shunter)))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", done.stdout + done.stderr


def instructions() -> dict[str, list[str]]:
    """Containerfile instruction → its arguments, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def test_the_container_runs_the_supervisor_on_the_containers_configuration() -> None:
    found = instructions()
    assert json.loads(found["ENTRYPOINT"][0]) == ["shunter", "run"]
    assert json.loads(found["CMD"][0]) == ["-c", "/app/shunter.yaml"]
    assert found["STOPSIGNAL"] == ["SIGTERM"]
    for copy in found["COPY"]:
        source, _ = copy.split()
        assert (ROOT / source).exists(), source
    assert "deploy/container/shunter.yaml /app/shunter.yaml" in found["COPY"]


def test_the_health_check_asks_the_admin_apis_health_path_on_its_port() -> None:
    check = instructions()["HEALTHCHECK"][0]
    url = re.search(r"http://([\d.]+):(\d+)(/\w+)", check)
    assert url is not None, check
    listen = yaml.safe_load(CONTAINER_YAML.read_text())["admin"]["listen"]
    assert listen.rsplit(":", 1)[1] == url.group(2)
    assert listen.rsplit(":", 1)[0] in ("0.0.0.0", url.group(1))
    admin = (ROOT / "src" / "shunter" / "observe" / "admin.py").read_text()
    assert f'web.get("{url.group(3)}"' in admin  # a route of the admin API
    assert url.group(3) == "/health"  # liveness: /ready is 503 on an idle, healthy instance
    assert f"EXPOSE {url.group(2)}" in CONTAINERFILE.read_text()


def without(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["kafka"] = {k: v for k, v in data["kafka"].items() if k != "bootstrap_servers"}
    data["admin"] = {k: v for k, v in data["admin"].items() if k != "listen"}
    data["crash_guard"] = {k: v for k, v in data["crash_guard"].items() if k != "crash_dir"}
    return data


def test_the_containers_configuration_is_the_examples_but_three_keys() -> None:
    example = yaml.safe_load((EXAMPLE / "shunter.yaml").read_text())
    container = yaml.safe_load(CONTAINER_YAML.read_text())
    assert without(container) == without(example)
    assert container["kafka"]["bootstrap_servers"] == "${SHUNTER_KAFKA_BOOTSTRAP}"


def test_shunter_check_accepts_the_containers_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Laid out as the image lays it out: the example's files with the container's YAML."""
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__", ".test-*"))
    shutil.copy(CONTAINER_YAML, app / "shunter.yaml")
    monkeypatch.setenv("SHUNTER_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.syspath_prepend(str(app))
    assert main(["check", "-c", str(app / "shunter.yaml")]) == 0
    assert "configuration OK" in capsys.readouterr().out
