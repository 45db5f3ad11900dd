"""Reading shunter's own topics from outside the dispatcher: one record by its coordinates,
or the whole dead-letter topic, filtered.

A dead-letter record is named by its ``<partition>:<offset>`` on the dead-letter topic
(``RecordId``). Reading assigns partitions directly: it never joins the dispatcher's
consumer group and never commits anything.

Reading "to the end" stops at each partition's end-of-partition event, not at the high
watermark: the embedded broker reports a watermark that can lag the last batch it stored.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from ..config import Config
from ..errors import ShunterError, UnreadableHeadersError
from ..message import read_headers
from . import headers as h

_STALL = 30.0  # seconds without any progress before a read gives up


class ReadError(ShunterError):
    """A topic or record cannot be read; the message says what to do."""


@dataclass(frozen=True, slots=True, order=True)
class RecordId:
    """A record of the dead-letter topic, written ``<partition>:<offset>``."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> RecordId:
        match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
        if not match:
            raise ValueError(
                f"expected a record ID <partition>:<offset> such as 0:42, got {text!r}"
            )
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @classmethod
    def of(cls, msg: Any) -> KafkaRecord:
        return cls(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            msg.timestamp()[1],
            msg.key(),
            msg.value(),
            _headers(msg),
        )


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A record of the dead-letter topic with its failure headers read (``info``), or the
    reason they could not be (``problem``)."""

    record: KafkaRecord
    info: h.FailureInfo | None
    problem: str = ""

    @property
    def id(self) -> RecordId:
        return RecordId(self.record.partition, self.record.offset)

    @classmethod
    def of(cls, record: KafkaRecord) -> DeadLetterRecord:
        try:
            return cls(record, h.decode(record.headers))
        except (KeyError, ValueError) as exc:
            return cls(record, None, f"unreadable shunter headers ({type(exc).__name__}: {exc})")


@dataclass(frozen=True)
class DlqFilter:
    """Which dead-letter records a command works on; every given criterion must hold."""

    caller: str | None = None  # exact; "" selects the records of no caller (rejects, crashes)
    error_type: str | None = None  # exact or the last dotted part, any case
    stage: str | None = None
    origin_topic: str | None = None
    since_ms: int | None = None  # dead-lettered at or after
    ids: frozenset[RecordId] = field(default_factory=frozenset)

    def matches(self, dead: DeadLetterRecord) -> bool:
        if self.ids and dead.id not in self.ids:
            return False
        if self.since_ms is not None and dead.record.timestamp_ms < self.since_ms:
            return False
        info = dead.info
        if info is None:  # unreadable: only an explicit ID or no criterion selects it
            return not (
                self.caller is not None or self.error_type or self.stage or self.origin_topic
            )
        return (
            (self.caller is None or info.caller == self.caller)
            and (self.error_type is None or _same_type(info.error_type, self.error_type))
            and (self.stage is None or info.stage == self.stage)
            and (self.origin_topic is None or info.origin_topic == self.origin_topic)
        )


def _same_type(actual: str, wanted: str) -> bool:
    actual, wanted = actual.lower(), wanted.lower()
    return actual == wanted or actual.endswith("." + wanted)


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: float | None = None) -> int:
    """``30m``, ``1h``, ``2d`` ago, or an ISO timestamp (local time unless it says) → ms."""
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return int((now - float(match.group(1)) * _SECONDS[match.group(2)]) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration such as 30m, 1h, 2d or an ISO timestamp such as "
            f"2025-05-01T12:00, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is the reader's local time
    return int(moment.timestamp() * 1000)


def client_settings(config: Config, bootstrap: str | None) -> dict[str, Any]:
    """librdkafka settings for a command: the config's ``kafka.client`` and its brokers
    (``bootstrap`` overrides them; the embedded broker's address is only known at run)."""
    servers = bootstrap or config.kafka.bootstrap_servers
    if not servers:
        raise ReadError(
            "kafka.bootstrap_servers is not set in the configuration (the dispatcher "
            "starts an embedded broker on a free port and logs its address): pass "
            "--bootstrap HOST:PORT"
        )
    from ..observe.logs import kafka_logger

    # librdkafka's own lines through shunter's logger: one calm line when Kafka is down
    return {**config.kafka.client, "bootstrap.servers": servers, "logger": kafka_logger()}


class TopicReader:
    """A consumer outside any group, for reading shunter's topics by hand."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._servers = settings.get("bootstrap.servers")
        self._consumer = Consumer(
            {
                "fetch.wait.max.ms": 100,  # the end of a partition is seen sooner
                **settings,
                "group.id": "shunter-cli-reader",  # never joined: partitions are assigned
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def partitions(self, topic: str) -> list[int]:
        try:
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        except Exception as exc:  # KafkaException: no broker answered
            why = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc
            raise ReadError(
                f"cannot reach Kafka at {self._servers} ({why}); check that a broker is "
                "running there and that kafka.bootstrap_servers (or --bootstrap) names it"
            ) from None
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReadError(f"topic {topic!r} does not exist on {self._servers}")
        return sorted(meta.partitions)

    def fetch(self, topic: str, partition: int, offset: int) -> KafkaRecord:
        """The record at ``topic[partition]@offset``; ReadError when there is none."""
        known = self.partitions(topic)
        if partition not in known:
            raise ReadError(f"topic {topic!r} has partitions 0..{known[-1]}, not {partition}")
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=10, cached=False
        )
        where = f"{topic}[{partition}] has no record at offset {offset}"
        if offset < low:
            raise ReadError(f"{where}: its oldest is {low} (older ones were deleted)")
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        # Past the high watermark, look briefly: the embedded broker's can lag its last batch.
        deadline = time.monotonic() + (_STALL if offset < high else 3.0)
        while time.monotonic() < deadline:
            for msg in self._consumer.consume(1, 0.5):
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    raise ReadError(f"{where} (it ends at {high})")
                if err is not None:
                    raise ReadError(f"reading {topic}[{partition}]: {err}")
                at = msg.offset() or 0
                if at < offset:  # past the end: the consumer went back to the start
                    raise ReadError(f"{where} (it ends at {high})")
                if at > offset:
                    raise ReadError(f"{where} (deleted or compacted; the next is {at})")
                return KafkaRecord.of(msg)
        raise ReadError(
            f"{where} (it ends at {high})" if offset >= high else f"{where} (timed out)"
        )

    def scan(self, topic: str, since_ms: int | None = None) -> Iterator[KafkaRecord]:
        """Every record of ``topic`` up to its current end, partition by partition in
        offset order; from about ``since_ms`` on when given (the broker's time index)."""
        starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in self.partitions(topic)]
        if since_ms is not None:
            starts = self._seek_time(topic, starts, since_ms)
        if not starts:
            return
        self._consumer.assign(starts)
        reading = {tp.partition for tp in starts}
        last_progress = time.monotonic()
        while reading:
            if time.monotonic() - last_progress > _STALL:
                raise ReadError(f"reading {topic} made no progress for {_STALL:.0f}s")
            for msg in self._consumer.consume(500, 0.1):
                last_progress = time.monotonic()
                err = msg.error()
                if err is None:
                    yield KafkaRecord.of(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    reading.discard(msg.partition())
                elif err.fatal():
                    raise ReadError(f"reading {topic}: {err}")

    def _seek_time(
        self, topic: str, starts: list[TopicPartition], since_ms: int
    ) -> list[TopicPartition]:
        try:
            found = self._consumer.offsets_for_times(
                [TopicPartition(topic, tp.partition, since_ms) for tp in starts], timeout=10
            )
        except Exception:  # a broker without a time index: read from the beginning
            return starts
        out = []
        for tp, at in zip(starts, found, strict=True):
            if at.error is not None:
                out.append(tp)
            elif at.offset >= 0:  # -1: nothing that recent in this partition
                out.append(TopicPartition(topic, tp.partition, at.offset))
        return out


def select(
    reader: TopicReader, topic: str, where: DlqFilter, limit: int | None = None
) -> tuple[list[DeadLetterRecord], int]:
    """The matching dead-letter records, oldest first (the newest ``limit`` of them when
    given), and how many matched in all. With IDs, only those records are fetched."""
    found: Iterator[KafkaRecord]
    if where.ids:
        found = (reader.fetch(topic, i.partition, i.offset) for i in sorted(where.ids))
    else:
        found = reader.scan(topic, where.since_ms)
    newest: list[tuple[int, RecordId, DeadLetterRecord]] = []  # a min-heap when limited
    total = 0
    for record in found:
        dead = DeadLetterRecord.of(record)
        if not where.matches(dead):
            continue
        total += 1
        entry = (record.timestamp_ms, dead.id, dead)
        if not limit:
            newest.append(entry)
        elif len(newest) < limit:
            heapq.heappush(newest, entry)
        else:
            heapq.heappushpop(newest, entry)
    return [dead for _, _, dead in sorted(newest)], total


def _headers(msg: Any) -> list[tuple[str, bytes]]:
    """A record's headers; none when a hostile producer made them unreadable (see
    message.read_headers: reading them the plain way could crash the interpreter)."""
    try:
        return [(k, v) for k, v in read_headers(msg) or [] if v is not None]
    except UnreadableHeadersError:
        return []


def summary(dead: DeadLetterRecord) -> dict[str, Any]:
    """One record as a list shows it (no traceback, no payload): the CLI's ``--json`` rows
    and the admin API's ``/deadletters`` answer."""
    out: dict[str, Any] = {"id": str(dead.id), "timestamp_ms": dead.record.timestamp_ms}
    info = dead.info
    if info is None:
        return {**out, "problem": dead.problem}
    return {
        **out,
        "caller": info.caller,
        "category": info.category,
        "stage": info.stage,
        "error_type": info.error_type,
        "error": info.error,
        "origin_topic": info.origin_topic,
        "origin_partition": info.origin_partition,
        "origin_offset": info.origin_offset,
        "attempt": info.attempt,
        "first_failure_ms": info.first_failure_ms,
        "signal": info.signal,
    }
