"""The message a handler receives: one delivery of one Kafka record to one caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commit.tracker import PartitionTracker


class Record:
    """A consumed Kafka record after decoding, shared by all its deliveries."""

    __slots__ = (
        "first_failure",
        "headers",
        "key",
        "offset",
        "partition",
        "ptrack",
        "raw",
        "seq",
        "timestamp",
        "topic",
        "value",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        raw: bytes,
        timestamp: int,
        headers: list[tuple[str, bytes]] | None,
        ptrack: PartitionTracker,
        seq: int,
        first_failure: int = 0,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.raw = raw
        self.timestamp = timestamp
        self.headers = headers
        self.value: Any = None
        # Where this record was consumed: a retry record's origin coordinates above name
        # the source topic, while ptrack/seq name the retry partition and offset that
        # must be settled before the committer may pass it.
        self.ptrack = ptrack
        self.seq = seq
        self.first_failure = first_failure  # ms since the epoch; 0 before any failure

    def settle_one(self) -> None:
        """One of this record's deliveries is settled."""
        self.ptrack.release(self.seq)


class Message:
    """One record as delivered to one subscriber.

    ``topic``/``partition``/``offset``/``timestamp`` are the record's origin: for a
    delivery read back from a retry tier they still name the source topic, so a handler
    sees the same message on every attempt. ``attempt`` starts at 1.
    """

    __slots__ = ("_record", "attempt", "caller", "category")

    def __init__(self, record: Record, caller: str, category: str, attempt: int = 1) -> None:
        self._record = record
        self.caller = caller
        self.category = category
        self.attempt = attempt

    @property
    def topic(self) -> str:
        return self._record.topic

    @property
    def partition(self) -> int:
        return self._record.partition

    @property
    def offset(self) -> int:
        return self._record.offset

    @property
    def key(self) -> bytes | None:
        return self._record.key

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return self._record.headers or []

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch, as Kafka stamped the record."""
        return self._record.timestamp

    @property
    def value(self) -> Any:
        """The decoded (and validated) value."""
        return self._record.value

    @property
    def raw(self) -> bytes:
        """The payload bytes exactly as they were on the source topic."""
        return self._record.raw

    def header(self, name: str) -> bytes | None:
        """The last header called ``name``, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def __repr__(self) -> str:
        return (
            f"Message({self.topic}[{self.partition}]@{self.offset}, caller={self.caller!r}, "
            f"category={self.category!r}, attempt={self.attempt})"
        )
