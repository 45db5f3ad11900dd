"""The demo's own Kafka clients: the stream's producer and a reader of the dead-letter
topic."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from ..observe.logs import kafka_logger
from ..settle import headers as h
from .stream import Event


class StreamProducer:
    """Produces the events at ``rate`` per second (0: as fast as it can); call ``run`` on a
    thread of its own. Counts are read by other threads: plain ints are enough there."""

    def __init__(self, bootstrap: str, events: Sequence[Event], rate: int) -> None:
        self._settings = {"bootstrap.servers": bootstrap, "linger.ms": 5, "logger": kafka_logger()}
        self._events = events
        self._rate = rate
        self._stop = threading.Event()
        self.total = len(events)
        self.acked = 0
        self.failed = 0
        self.last_error = ""
        self.finished = threading.Event()

    def run(self) -> None:
        producer = Producer(self._settings)
        started = time.monotonic()
        every = max(1, min(100, self._rate // 50))  # paced in steps of at most 20 ms
        try:
            for i, event in enumerate(self._events):
                if i % every == 0:
                    if self._stop.is_set():
                        break
                    ahead = started + i / self._rate - time.monotonic() if self._rate else 0
                    if ahead > 0:
                        time.sleep(ahead)
                    producer.poll(0)
                self._produce(producer, event)
            producer.flush(30)
        finally:
            self.finished.set()

    def stop(self) -> None:
        self._stop.set()

    def _produce(self, producer: Any, event: Event) -> None:
        while True:
            try:
                producer.produce(
                    event.topic,
                    event.value,
                    event.key,
                    timestamp=event.timestamp_ms,
                    on_delivery=self._delivered,
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.failed += 1
            self.last_error = str(err)


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    info: h.FailureInfo  # what its headers say
    value: bytes | None  # the source record's payload, unchanged


def read_dead_letters(
    bootstrap: str, topic: str, expect: int, timeout: float = 15.0
) -> list[h.FailureInfo]:
    """The failure headers of the dead-letter topic's records, oldest failure first."""
    return [record.info for record in read_dead_letter_records(bootstrap, topic, expect, timeout)]


def admin_settings(bootstrap: str) -> dict[str, Any]:
    """Settings for the demo's own admin calls: its broker, librdkafka's lines rate-limited."""
    return {"bootstrap.servers": bootstrap, "logger": kafka_logger()}


def read_dead_letter_records(
    bootstrap: str, topic: str, expect: int, timeout: float = 15.0
) -> list[DeadLetterRecord]:
    """The dead-letter topic's records, headers decoded, oldest failure first.

    Reads until ``expect`` records or the end of every partition, whichever comes first.
    The end is the one fetching reports: the embedded broker's answer to a watermark
    query lags behind the last batch written.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "logger": kafka_logger(),
            "group.id": "shunter-demo-dlq-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    found: list[DeadLetterRecord] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int | None] = set()
        deadline = time.monotonic() + timeout
        while len(found) < expect and len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                break
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                at_end.discard(msg.partition())
                try:
                    info = h.decode(cast("list[tuple[str, bytes]] | None", msg.headers()))
                except (KeyError, ValueError):
                    continue
                found.append(DeadLetterRecord(info, msg.value()))
    finally:
        consumer.close()
    return sorted(found, key=lambda record: record.info.first_failure_ms)
