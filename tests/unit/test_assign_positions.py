"""Where the consumer assigns its partitions from, given the committed offsets it read in
the assign callback (the Kafka behaviour itself: tests/integration/test_start_position.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from shunter.consume.source import KafkaSource


class Recorder:
    """Stands in for the confluent-kafka Consumer: records the assign calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int, int]]]] = []

    def incremental_assign(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("incremental", [(t.topic, t.partition, t.offset) for t in tps]))

    def assign(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("whole", [(t.topic, t.partition, t.offset) for t in tps]))


@pytest.fixture
def source_for() -> Iterator[Any]:
    made: list[KafkaSource] = []
    loop = asyncio.new_event_loop()

    def make(**settings: Any) -> KafkaSource:
        source = KafkaSource(
            {"bootstrap.servers": "127.0.0.1:9", "group.id": "g", "log_level": 0, **settings},
            ["orders", "g.retry.fast"],
            handler=None,  # type: ignore[arg-type]  # the callbacks are not run here
            loop=loop,
            source_topics=["orders"],
        )
        made.append(source)
        return source

    yield make
    for source in made:
        source._consumer.close()
    loop.close()


def read(committed: dict[tuple[str, int], int]) -> tuple[list[TopicPartition], list[Any]]:
    """The callback's partitions, and what ``committed()`` returned for them (-1001: none;
    as plain objects, since a TopicPartition's error cannot be set from Python)."""
    partitions = [TopicPartition(t, p) for t, p in committed]
    positions = [
        SimpleNamespace(topic=t, partition=p, offset=o, error=None)
        for (t, p), o in committed.items()
    ]
    return partitions, positions


def test_source_partitions_go_first_from_their_commits_the_rest_from_the_reset(
    source_for: Any,
) -> None:
    source, consumer = source_for(), Recorder()
    partitions, positions = read(
        {("g.retry.fast", 0): -1001, ("orders", 0): 17, ("orders", 1): -1001}
    )
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == [
        ("incremental", [("orders", 0, 17), ("orders", 1, OFFSET_BEGINNING)]),
        ("incremental", [("g.retry.fast", 0, OFFSET_BEGINNING)]),
    ]


def test_reset_latest_starts_a_never_committed_partition_at_its_end(source_for: Any) -> None:
    source, consumer = source_for(**{"auto.offset.reset": "latest"}), Recorder()
    partitions, positions = read({("orders", 0): -1001, ("orders", 1): 5})
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == [("incremental", [("orders", 0, OFFSET_END), ("orders", 1, 5)])]


def test_an_eager_assignor_gets_the_whole_assignment_in_one_call(source_for: Any) -> None:
    source = source_for(**{"partition.assignment.strategy": "roundrobin"})
    consumer = Recorder()
    partitions, positions = read({("g.retry.fast", 0): 3, ("orders", 0): -1001})
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == [("whole", [("g.retry.fast", 0, 3), ("orders", 0, OFFSET_BEGINNING)])]


def test_reset_error_leaves_the_assignment_to_librdkafka(source_for: Any) -> None:
    source, consumer = source_for(**{"auto.offset.reset": "error"}), Recorder()
    partitions, positions = read({("orders", 0): -1001})
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == []


def test_an_offset_that_could_not_be_read_is_not_taken_for_none(source_for: Any) -> None:
    """Given committed() answered one partition with an error (its offset unknown, not
    absent), when the positions are assigned, then nothing is: resetting that partition
    would skip its backlog (latest) or replay it (earliest); librdkafka reads it again."""
    source, consumer = source_for(**{"auto.offset.reset": "latest"}), Recorder()
    partitions, positions = read({("orders", 0): 40, ("orders", 1): -1001})
    positions[1].error = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == []


class Refusing(Recorder):
    """Refuses the first assign call, as librdkafka does when its state forbids it."""

    def incremental_assign(self, tps: list[TopicPartition]) -> None:
        if not self.calls:
            self.calls.append(("refused", []))
            raise KafkaException(KafkaError(KafkaError._STATE))
        super().incremental_assign(tps)


def test_a_refused_assignment_falls_back_to_the_partitions_as_given(source_for: Any) -> None:
    """Given librdkafka refuses the positions, when they are assigned, then the partitions
    are assigned as the callback got them (offsets unset: librdkafka's own start), since
    confluent-kafka no longer assigns by itself after the callback called assign."""
    source, consumer = source_for(), Refusing()
    partitions, positions = read({("orders", 0): 12})
    source._start_at(consumer, partitions, positions)
    assert consumer.calls == [("refused", []), ("incremental", [("orders", 0, -1001)])]
