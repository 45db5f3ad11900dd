"""Given the example deployment in examples/live-revenue (its YAML, schemas, model,
handlers and HTTP receiver, used as they are), when it runs on a real broker with the
example's own producer, then every team gets what the README says, the bad messages are
dead letters with a reason, and the admin API answers the health check that the
container recipe and the systemd notes use."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

import shunter
from kafkatools import Broker
from shunter.broker.embedded import free_port
from shunter.settle.dlqread import DlqFilter, TopicReader, select
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "live-revenue"
N = 20  # events per topic


def load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[str]]]:
    """examples/live-revenue/receiver.py on a free port; the lines it prints."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-u", str(EXAMPLE / "receiver.py"), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        yield port, lines
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)
        proc.stdout.close()


def healthcheck_path() -> str:
    """The path the container recipe's HEALTHCHECK asks for."""
    text = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    found = re.search(r"HEALTHCHECK .*?http://127\.0\.0\.1:(\d+)(/\w+)", text, re.DOTALL)
    assert found is not None
    return found.group(2)


def test_the_example_deployment_runs_as_its_readme_says(
    broker: Broker, unique: str, receiver: tuple[int, list[str]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, posted = receiver
    data = yaml.safe_load((EXAMPLE / "shunter.yaml").read_text())
    # Only what a test must change: unique names, this broker, free ports, quick retries.
    names = {t: f"{t}-{unique}" for t in data["topics"]}
    data["topics"] = {names[t]: v for t, v in data["topics"].items()}
    for category in data["categories"].values():
        category["topics"] = [names[t] for t in category["topics"]]
    data["kafka"] = {"bootstrap_servers": broker.bootstrap, "group_id": f"example-{unique}",
                     "consumer": broker.client, "commit_interval": "100ms"}
    admin = free_port()
    data["admin"]["listen"] = f"127.0.0.1:{admin}"
    data["retry"] = {"fast": {"attempts": 1, "delay": "200ms"},
                     "slow": {"attempts": 1, "delay": "500ms"}, "partitions": 2}
    http = next(s for s in data["subscribers"] if "http" in s)
    http["http"]["url"] = http["http"]["url"].replace(":8091/", f":{port}/")
    path = EXAMPLE / f".test-{unique}.yaml"  # beside the example: its schemas and modules
    path.write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.txt"
    monkeypatch.setenv("REVENUE_LEDGER", str(ledger))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLE}:{__import__('os').environ.get('PYTHONPATH', '')}")
    try:
        broker.create({names["gift"]: 3, names["lottery"]: 2, names["guard_purchase"]: 2})
        events = load(f"produce_{unique}", EXAMPLE / "produce.py").events(N)
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        for topic, key, value in events:
            producer.produce(names[topic], json.dumps(value).encode(), key.encode())
        assert producer.flush(30) == 0
        del producer

        app = shunter.Dispatcher(path)
        buys = [i for i in range(N) if i % 4]
        no_effect = [i for i in buys if i % 25 == 3]
        want = Counter({"fan-medal": 2 * N, "rank-board": 2 * N,
                        "guard-effect": len(buys) - len(no_effect)})

        def done() -> bool:
            return received(ledger) == want and len(anchor(posted)) == len(buys)

        with DispatcherThread(app) as running:
            running.wait_for(done, timeout=90)
            base = f"http://127.0.0.1:{admin}"
            with urllib.request.urlopen(base + healthcheck_path(), timeout=5) as answer:
                assert answer.status == 200
            running.wait_for(lambda: ready(base), timeout=30)
            dlq = app.config.dlq_topic
            running.wait_for(lambda: len(dead(broker, dlq)) == 1 + len(no_effect), timeout=30)
        assert received(ledger) == want  # nothing twice
        assert sorted(anchor(posted)) == sorted(f"a{i % 5} +198 coins" for i in buys)
        letters = dead(broker, dlq)
        stages = Counter((d.info.stage, d.info.caller) for d in letters)
        assert stages == {("validate", ""): 1, ("deliver", "guard-effect"): len(no_effect)}
        assert all("has no effect object" in d.info.error for d in letters if d.info.caller)
    finally:
        path.unlink(missing_ok=True)


def received(ledger: Path) -> Counter[str]:
    if not ledger.exists():
        return Counter()
    return Counter(line.split()[0] for line in ledger.read_text().splitlines())


def anchor(posted: list[str]) -> list[str]:
    return [line.split(": ", 1)[1].split(" (")[0] for line in posted
            if line.startswith("anchor-task:")]


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=5) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False


def dead(broker: Broker, topic: str) -> list[Any]:
    with TopicReader({"bootstrap.servers": broker.bootstrap}) as reader:
        return select(reader, topic, DlqFilter())[0]
