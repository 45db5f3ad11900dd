"""Given a dispatcher behind on one partition, when Apache Kafka's own
``kafka-consumer-groups.sh --describe`` (``ConsumerGroupCommand``, run with the jars of the
reference broker) describes the group, then shunter's ``kafka_consumergroup_group_lag``
says the same where the group has committed; where it has committed nothing (an unused
partition) the tool prints "-" and shunter, which knows where the group would start,
reports 0.

Depends on ``Pipeline.status()`` (the lead's half of issue #12); Apache Kafka only (the
embedded broker under-reports end offsets, SPEC "Real parts")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

import shunter
from admintools import Api, admin_config, free_port, handlers_module
from kafkatools import Broker
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
TOOL = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"


def kafka_version() -> str:
    pom = (ROOT / "scripts/kafka/pom.xml").read_text()
    found = re.search(r"<kafka.version>(.+?)</kafka.version>", pom)
    assert found
    return os.environ.get("SHUNTER_KAFKA_VERSION", found.group(1))


def consumer_groups_command() -> list[str]:
    """``java -cp <broker libs>:<kafka-tools jar> ConsumerGroupCommand``. The reference
    broker's libs lack the tools jar: it is fetched once into ~/.m2 with Maven (which
    scripts/kafka already needs)."""
    version = kafka_version()
    cache = Path(os.environ.get("SHUNTER_KAFKA_CACHE", Path.home() / ".cache/shunter-kafka"))
    libs = cache / version / "libs"
    if not libs.is_dir():
        pytest.fail(f"no Kafka jars in {libs}: start Apache Kafka with scripts/kafka/kafka")
    tools = Path.home() / f".m2/repository/org/apache/kafka/kafka-tools/{version}"
    jar = tools / f"kafka-tools-{version}.jar"
    if not jar.exists() and shutil.which("mvn"):
        subprocess.run(
            ["mvn", "-q", "-B", "dependency:get", f"-Dartifact=org.apache.kafka:kafka-tools:"
             f"{version}", "-Dtransitive=false"],
            check=False, capture_output=True, timeout=300,
        )  # fmt: skip
    if not jar.exists():
        pytest.fail(f"{jar} is missing and Maven could not fetch it")
    java = (
        os.path.join(os.environ["JAVA_HOME"], "bin/java") if "JAVA_HOME" in os.environ else "java"
    )
    return [java, "-cp", f"{libs}/*:{jar}", TOOL]


def describe(command: list[str], bootstrap: str, group: str) -> dict[tuple[str, int], str]:
    """(topic, partition) -> the LAG column ("-" where the group has no committed offset)."""
    out = subprocess.run(
        [*command, "--bootstrap-server", bootstrap, "--describe", "--group", group],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rows: dict[tuple[str, int], str] = {}
    for line in out.stdout.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0] == group and cells[2].isdigit():
            rows[(cells[1], int(cells[2]))] = cells[5]
    return rows


def exported_lag(api: Api, group: str, topic: str) -> dict[int, str]:
    """partition -> shunter's kafka_consumergroup_group_lag ("-" when it exports none)."""
    text = api.text("/metrics")
    lags: dict[int, str] = {}
    for partition in range(3):
        labels = f'group="{group}",kind="source",partition="{partition}",topic="{topic}"'
        found = re.search(
            rf"^kafka_consumergroup_group_lag\{{{re.escape(labels)}\}} (\S+)$", text, re.M
        )
        lags[partition] = str(int(float(found.group(1)))) if found else "-"
    return lags


def test_lag_matches_kafka_consumer_groups_describe(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    if broker.kind != "kafka":
        pytest.skip("compared with Apache Kafka's own tool; Tansu under-reports end offsets")
    command = consumer_groups_command()
    module, handlers = handlers_module(tmp_path, unique)
    port = free_port()
    app = shunter.Dispatcher(admin_config(broker, unique, module, port, partitions=3))
    gift, group, api = f"gift-{unique}", f"g-{unique}", Api(port)
    producer = Producer({"bootstrap.servers": broker.bootstrap})

    def produce(partition: int, values: list[dict[str, object]]) -> None:
        for i, value in enumerate(values):
            producer.produce(gift, orjson.dumps(value), key=f"{partition}-{i}", partition=partition)
        assert producer.flush(30) == 0

    def tool_lag() -> dict[int, str]:
        rows = describe(command, broker.bootstrap, group)
        return {p: lag for (t, p), lag in rows.items() if t == gift}

    handlers.GATE["open"] = False
    with DispatcherThread(app) as running:
        try:
            # given partition 0 held at its 3rd of 7 records, partition 1 all done, 2 unused
            produce(0, [{"n": i, "user": {"id": i}, "hold": i == 2} for i in range(7)])
            produce(1, [{"n": 10 + i, "user": {"id": i}} for i in range(4)])
            running.wait_for(lambda: len(handlers.RANK) == 10, timeout=60)
            # then shunter's gauge and Kafka's tool agree where the group has committed
            running.wait_for(lambda: exported_lag(api, group, gift) == {0: "5", 1: "0", 2: "0"})
            running.wait_for(lambda: tool_lag() == {0: "5", 1: "0", 2: "-"}, interval=0.5)
            exported, tool = exported_lag(api, group, gift), tool_lag()
            assert [exported[p] for p in (0, 1)] == [tool[p] for p in (0, 1)]
        finally:
            handlers.GATE["open"] = True

        # when the held record is done, both go to 0 on partition 0
        running.wait_for(lambda: exported_lag(api, group, gift)[0] == "0", timeout=30)
        running.wait_for(lambda: tool_lag()[0] == "0", timeout=30, interval=0.5)
