"""Reading a consumed record: confluent-kafka's own Message and any stand-in alike."""

from __future__ import annotations

from typing import Any

import confluent_kafka as ck
from confluent_kafka import KafkaError

from shunter.message import (
    error_of,
    key_of,
    offset_of,
    partition_of,
    timestamp_of,
    topic_of,
    value_of,
)

READERS = (error_of, topic_of, partition_of, offset_of, key_of, value_of, timestamp_of)
METHODS = ("error", "topic", "partition", "offset", "key", "value", "timestamp")


class StandIn:
    """A record of another type, as the tests' fakes are: read by name."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        return lambda: self.fields[name]


def test_the_readers_agree_with_the_record_s_own_methods() -> None:
    kafka = ck.Message(
        topic="gifts",
        partition=3,
        offset=41,
        key=b"k",
        value=b"{}",
        timestamp=(ck.TIMESTAMP_CREATE_TIME, 1_700_000_000_000),
    )
    stand_in = StandIn(
        error=None,
        topic="lottery",
        partition=1,
        offset=7,
        key=None,
        value=b"[]",
        timestamp=(ck.TIMESTAMP_CREATE_TIME, 5),
    )
    for record in (kafka, stand_in):
        read = [reader(record) for reader in READERS]
        assert read == [getattr(record, name)() for name in METHODS]
    assert [topic_of(stand_in), offset_of(stand_in)] == ["lottery", 7]


def test_a_consumer_event_reads_its_error() -> None:
    event = ck.Message(topic="gifts", partition=0, error=KafkaError(KafkaError._PARTITION_EOF))
    error = error_of(event)
    assert error is not None and error.code() == KafkaError._PARTITION_EOF
