"""Reading a compacted topic as a table (the last value of each key), once or live."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

log = logging.getLogger("shunter.broker")


def read_table(
    settings: dict[str, Any], topic: str, keys: set[bytes] | None = None, timeout: float = 30.0
) -> dict[bytes, bytes]:
    """The last value of each key (of ``keys``, or all) in ``topic``; a tombstone removes.

    Reads until librdkafka reports end-of-partition rather than up to the high watermark:
    the embedded broker reports a watermark that lags its last batch.
    """
    consumer = Consumer(
        {
            # Its first request needs a new connection to the partition's leader, which
            # librdkafka holds back for half this backoff after the bootstrap one (50 ms
            # at the default 100 ms). A failed connection still backs off exponentially.
            "reconnect.backoff.ms": 10,
            **settings,
            "group.id": "shunter-table-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # The end of a partition is known from a fetch the broker answers at its end:
            # one it holds for fetch.wait.max.ms (librdkafka's default 500 ms) waiting for
            # records that do not come. Each assignment waits for this read (the crash
            # guard's journal) before its partitions run.
            "fetch.wait.max.ms": 1,
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
            # consume() returns at its timeout unless it filled the batch: short calls,
            # so the end-of-partition events are seen as they come.
            for msg in consumer.consume(1000, 0.002):
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


Record = Callable[[bytes, bytes | None], None]


class TableFollower:
    """Follow a compacted topic live, on a thread of its own, without group membership.

    Every partition is assigned from its beginning; ``on_record(key, value)`` (value None:
    a tombstone) runs on the follower's thread for every keyed record, in log order per
    partition, and ``on_caught_up()`` once, after the records that were in the topic when
    it started (end-of-partition seen on every partition: see ``read_table``). Then it
    keeps reading new records as they come (a fetch waits at most 100 ms on the broker).
    ``on_failed(exc)`` reports a failure, after which it follows again from the start.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        topic: str,
        on_record: Record,
        on_caught_up: Callable[[], None],
        on_failed: Callable[[BaseException], None] = lambda _exc: None,
    ) -> None:
        self._settings = {
            **settings,
            "group.id": "shunter-table-follower",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
        self._topic = topic
        self._on_record = on_record
        self._on_caught_up = on_caught_up
        self._on_failed = on_failed
        self._stop = threading.Event()
        self.records = 0  # records read so far (this thread writes it)
        self.failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"shunter-follow-{topic}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        """Follow; after a failure (the broker gone, say), start again from the beginning:
        reading the table again is harmless, since only the last value of a key counts."""
        while not self._stop.is_set():
            consumer = Consumer(self._settings)
            try:
                self._follow(consumer)
            except Exception as exc:  # reported: a silent follower would be worse
                self.failed = exc
                self._on_failed(exc)
                self._stop.wait(1.0)
            finally:
                consumer.close()

    def _follow(self, consumer: Consumer) -> None:
        deadline = time.monotonic() + 30.0
        while True:
            meta = consumer.list_topics(self._topic, timeout=10).topics.get(self._topic)
            if meta is not None and meta.error is None and meta.partitions:
                break
            if time.monotonic() > deadline or self._stop.is_set():
                raise RuntimeError(f"topic {self._topic} not found")
            time.sleep(0.2)
        pending = set(meta.partitions)
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in pending])
        while not self._stop.is_set():
            for msg in consumer.consume(500, 0.1):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if pending:
                            pending.discard(msg.partition() or 0)
                            if not pending:
                                self._on_caught_up()
                    else:
                        log.warning("following %s: %s", self._topic, err)
                    continue
                key = msg.key()
                if key is not None:
                    self.records += 1
                    self._on_record(key, msg.value())
