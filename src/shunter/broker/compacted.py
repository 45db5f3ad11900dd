"""Reading a compacted topic as a table: the last value of each key."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition


def read_table(
    settings: dict[str, Any], topic: str, keys: set[bytes] | None = None, timeout: float = 30.0
) -> dict[bytes, bytes]:
    """The last value of each key (of ``keys``, or all) in ``topic``; a tombstone removes.

    Reads until librdkafka reports end-of-partition rather than up to the high watermark:
    the embedded broker reports a watermark that lags its last batch.
    """
    consumer = Consumer(
        {
            **settings,
            "group.id": "shunter-table-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    table: dict[bytes, bytes] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return table
        pending = set(meta.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in pending])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout:.0f}s")
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition() or 0)
                    continue
                key, value = msg.key(), msg.value()
                if key is None or (keys is not None and key not in keys):
                    continue
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
    finally:
        consumer.close()
    return table
