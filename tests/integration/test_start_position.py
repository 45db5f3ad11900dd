"""Where an assigned partition starts: at the group's committed offset, and where there is
none, where ``auto.offset.reset`` says (the consumer assigns these positions itself, from
the committed offsets it reads for the crash guard, rather than leave librdkafka to read
them again and to back off before resetting)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

import shunter
from kafkatools import Broker, config
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

PARTITIONS = 3
PER_PARTITION = 10


def produce_to(broker: Broker, topic: str, partition: int, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for value in values:
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(30) == 0


def app_recording(broker: Broker, group: str, topic: str, seen: list[tuple[int, int]],
                  **consumer: object) -> shunter.Dispatcher:
    settings = config(broker, group, topics={topic: {"format": "raw"}},
                      categories={"all": {"topics": [topic]}}, subscribers=[])
    settings["kafka"]["consumer"] = {**settings["kafka"]["consumer"], **consumer}
    app = shunter.Dispatcher(settings)

    @app.subscriber("all", caller="recorder")
    async def record(msg: shunter.Message) -> None:
        seen.append((msg.partition, msg.offset))
        await asyncio.sleep(0)

    return app


def test_committed_partitions_resume_there_and_the_others_from_the_beginning(
    broker: Broker, unique: str
) -> None:
    """Given a group that committed 4 on partition 0 and 7 on partition 1 and nothing on
    partition 2, of 10 records each,
    when the dispatcher joins that group,
    then it delivers offsets 4 to 9, 7 to 9 and 0 to 9 of those partitions, each once."""
    topic, group = f"start-{unique}", f"g-{unique}"
    broker.create({topic: PARTITIONS})
    for p in range(PARTITIONS):
        produce_to(broker, topic, p, [f"{p}-{i}".encode() for i in range(PER_PARTITION)])
    committer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic, 0, 4), TopicPartition(topic, 1, 7)],
                     asynchronous=False)
    committer.close()
    seen: list[tuple[int, int]] = []
    expected = ({(0, o) for o in range(4, 10)} | {(1, o) for o in range(7, 10)}
                | {(2, o) for o in range(10)})
    with DispatcherThread(app_recording(broker, group, topic, seen)) as running:
        running.wait_for(lambda: len(seen) >= len(expected), timeout=60)
        time.sleep(0.5)  # anything delivered beyond them would be a wrong start position
    assert set(seen) == expected
    assert max(Counter(seen).values()) == 1


def test_with_reset_latest_a_partition_never_committed_starts_at_its_end(
    broker: Broker, unique: str
) -> None:
    """Given 10 records on each partition of a topic no group ever read,
    when the dispatcher joins with ``auto.offset.reset: latest`` and records keep being
    produced afterwards,
    then none of the first 10 of any partition is delivered, and from the first later
    record delivered on a partition, every later one is."""
    topic, group = f"latest-{unique}", f"g-{unique}"
    broker.create({topic: PARTITIONS})
    for p in range(PARTITIONS):
        produce_to(broker, topic, p, [b"old"] * PER_PARTITION)
    seen: list[tuple[int, int]] = []
    app = app_recording(broker, group, topic, seen, **{"auto.offset.reset": "latest"})
    produced = dict.fromkeys(range(PARTITIONS), PER_PARTITION)
    with DispatcherThread(app) as running:
        # The end is resolved a moment after the assignment; a record produced before that
        # is skipped as "old". Produce until every partition delivered one, then 5 more.
        deadline = time.monotonic() + 60
        while {p for p, _ in seen} != set(range(PARTITIONS)):
            assert time.monotonic() < deadline, f"nothing new delivered: {seen}"
            for p in range(PARTITIONS):
                produce_to(broker, topic, p, [b"new"])
                produced[p] += 1
            time.sleep(0.2)
        for p in range(PARTITIONS):
            produce_to(broker, topic, p, [b"new"] * 5)
            produced[p] += 5
        running.wait_for(lambda: all(
            (p, produced[p] - 1) in seen for p in range(PARTITIONS)
        ))
    for p in range(PARTITIONS):
        offsets = sorted(o for q, o in seen if q == p)
        assert offsets[0] >= PER_PARTITION, f"partition {p} delivered old records: {offsets}"
        assert offsets == list(range(offsets[0], offsets[-1] + 1)), offsets
