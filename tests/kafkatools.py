"""Small helpers the Kafka tests share: topics, producing, reading back, configs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from shunter.broker.admin import ensure_topics


@dataclass(frozen=True)
class Broker:
    kind: str  # embedded | kafka
    bootstrap: str

    @property
    def client(self) -> dict[str, Any]:
        """Client settings for shunter's YAML ``kafka.client``."""
        if self.kind == "embedded":  # Tansu joins groups in ~3 s with these
            return {"session.timeout.ms": 6000, "max.poll.interval.ms": 10000}
        return {"session.timeout.ms": 6000}

    def create(self, topics: dict[str, int]) -> None:
        ensure_topics({"bootstrap.servers": self.bootstrap}, topics)

    def produce(self, topic: str, values: list[Any], key: Any = None, raw: bool = False) -> None:
        """Produce values (JSON-encoded unless raw); ``key(i, value)`` gives each key."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for i, value in enumerate(values):
            k = key(i, value) if callable(key) else key
            if isinstance(k, str):
                k = k.encode()
            producer.produce(topic, value=value if raw else orjson.dumps(value), key=k)
            if i % 1000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0

    def read_all(self, topic: str, expect: int | None = None, timeout: float = 30.0) -> list[Any]:
        """Every record of ``topic`` from the beginning (confluent Message objects)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{time.time_ns()}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "enable.partition.eof": True, **self.client})
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Any] = []
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    out.append(msg)
                elif msg.error().code() == -191:  # partition EOF
                    eof.add(msg.partition())
            if expect is None and len(eof) == len(meta.partitions):
                break
            if expect is not None and len(out) >= expect:
                break
        consumer.close()
        return out

    def committed(self, group: str, topic: str, partitions: int) -> list[int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, **self.client})
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        consumer.close()
        return [tp.offset for tp in got]


def config(broker: Broker, group: str, topics: dict[str, Any], categories: dict[str, Any],
           subscribers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A shunter configuration dict for tests (admin API off unless given)."""
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": broker.bootstrap, "group_id": group,
                  "consumer": broker.client, "commit_interval": "100ms"},
        "topics": topics,
        "categories": categories,
        "subscribers": subscribers,
        "admin": {"listen": None},
        "retry": {"fast": {"attempts": 2, "delay": "200ms"}, "slow": {"attempts": 1, "delay": "500ms"},
                  "partitions": 2},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data
