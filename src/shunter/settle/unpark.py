"""Re-driving a resumed caller's parked deliveries into the fast retry tier.

While a caller is paused, every instance sets its deliveries aside once in
``<group>.parked`` (a topic the group never consumes), each record carrying the retry
headers of its delivery with tier ``parked``. On resume, one instance reads the parked
topic from the caller's cursor (how far it was re-driven before; the beginning if never)
and writes that caller's records to the fast tier with tier ``fast`` and every other
header unchanged: a delivery that was a retry keeps its attempt and not-before time, a
source delivery comes back as attempt 1, due now. Other callers' records are skipped.

The read goes on until every partition's end was reached *and* ``grace`` seconds have
passed, so what instances that had not yet read the resume record parked meanwhile is
taken too. The new cursor (one past the last record read) is returned for the caller to
record; until it is, a later resume reads the same records again (at-least-once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from ..errors import UnreadableHeadersError
from ..message import read_headers
from . import headers as h

log = logging.getLogger("shunter.settle")


@dataclass
class Unparked:
    written: int = 0
    skipped: int = 0  # this caller's records whose headers could not be read
    failed: list[str] = field(default_factory=list)
    cursor: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    stopped: bool = False


def caller_of(headers: list[tuple[str, bytes]] | None) -> bytes | None:
    """The record's caller header; of several, the last, as ``headers.decode`` reads it
    (the caller its re-drive goes to must be the one it was selected for)."""
    found = None
    for key, value in headers or ():
        if key == h.CALLER and value is not None:
            found = value
    return found


def unpark(
    settings: dict[str, Any],
    parked_topic: str,
    fast_topic: str,
    caller: str,
    cursor: dict[int, int] | None,
    grace: float,
    stop: threading.Event,
    timeout: float = 600.0,
) -> Unparked:
    """Write ``caller``'s parked records at or past ``cursor`` to ``fast_topic``."""
    result = Unparked()
    consumer = Consumer(
        {
            **settings,
            "group.id": "shunter-unpark",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
    )
    producer = Producer(
        {
            **settings,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 30_000,
        }
    )
    wanted = caller.encode()

    def report(err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            result.written += 1
        else:
            result.failed.append(str(err))

    try:
        meta = consumer.list_topics(parked_topic, timeout=10).topics.get(parked_topic)
        if meta is None or meta.error is not None:
            raise RuntimeError(f"parked topic {parked_topic} not found")
        start = {p: (cursor or {}).get(p, OFFSET_BEGINNING) for p in meta.partitions}
        for p, offset in start.items():
            low, _ = consumer.get_watermark_offsets(TopicPartition(parked_topic, p), timeout=10)
            if 0 <= offset < low:
                log.error(
                    "%s[%d]: offsets %d..%d expired (retention) before caller %s was "
                    "resumed; whatever of its deliveries they held is lost",
                    parked_topic, p, offset, low - 1, caller,
                )  # fmt: skip
        consumer.assign([TopicPartition(parked_topic, p, o) for p, o in start.items()])
        result.cursor = {p: o for p, o in start.items() if o >= 0}
        at_end: set[int] = set()
        began = time.monotonic()
        while len(at_end) < len(start) or time.monotonic() - began < grace:
            if stop.is_set():
                result.stopped = True
                break
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"re-driving {caller} took over {timeout:.0f}s")
            for msg in consumer.consume(500, 0.1):
                err = msg.error()
                partition = msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end.add(partition)
                        end = msg.offset()
                        if end is not None and end >= 0:
                            result.cursor[partition] = end
                    else:
                        log.warning("reading %s: %s", parked_topic, err)
                    continue
                at_end.discard(partition)
                result.cursor[partition] = (msg.offset() or 0) + 1
                try:
                    found = read_headers(msg)  # type: ignore[arg-type]
                    headers = [(k, v) for k, v in found or [] if v is not None]
                except UnreadableHeadersError:  # not shunter's record: skip it
                    continue
                if caller_of(headers) != wanted:
                    continue
                try:
                    info = h.decode(headers)
                except (KeyError, ValueError) as exc:
                    log.error(
                        "parked record %s[%d]@%d of caller %s has unreadable "
                        "headers (%s); left where it is",
                        parked_topic,
                        partition,
                        msg.offset(),
                        caller,
                        exc,
                    )
                    result.skipped += 1
                    continue
                own = [(k, v) for k, v in headers if not k.startswith(h.PREFIX)]
                _produce(
                    producer,
                    fast_topic,
                    msg.key(),
                    msg.value(),
                    h.encode(replace(info, tier="fast")) + own,
                    report,
                )
                producer.poll(0)
    finally:
        left = producer.flush(60)
        if left:
            result.failed.append(f"{left} records not acknowledged within 60s")
        consumer.close()
    return result


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    report: Any,
) -> None:
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=report)  # type: ignore[arg-type]
            return
        except BufferError:  # the local queue is full: let acknowledgements drain it
            producer.poll(0.1)
