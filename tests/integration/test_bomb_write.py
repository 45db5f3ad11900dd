"""Given topics that take records of about 1 MB at most (Apache Kafka's default), when the
producer of the retry tiers and the dead-letter topic writes back a compression bomb (a
value inflating to 16 MB of one repeated byte, as a hostile producer sends it), then the
broker takes it: it goes back compressed small, and reads back whole."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kafkatools import Broker
from shunter.settle.producer import ReliableProducer

pytestmark = pytest.mark.kafka

INFLATED = 16 * 1024 * 1024


def test_a_compression_bomb_is_written_back_small_enough_for_the_topic(broker: Broker) -> None:
    topic = f"bomb-{uuid.uuid4().hex[:8]}"
    broker.create({topic: 1})
    value = b'{"user": "' + b"a" * INFLATED + b'"}'

    async def write() -> None:
        # An operator who takes such records raises the client's limit (librdkafka checks
        # the inflated size); the broker checks the compressed batch.
        settings = {"bootstrap.servers": broker.bootstrap, "message.max.bytes": 4 * INFLATED}
        producer = ReliableProducer(settings, asyncio.get_running_loop())
        try:
            await producer.wait(topic, b"bomb", value, [("shunter-stage", b"validate")])
        finally:
            producer.close()

    asyncio.run(write())
    [record] = broker.read_all(topic, expect=1, timeout=60)
    assert record.value() == value
    assert record.headers() == [("shunter-stage", b"validate")]
