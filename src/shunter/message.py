"""The message a handler receives: one delivery of one Kafka record to one caller."""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import confluent_kafka

from .errors import UnreadableHeadersError

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

    from .commit.tracker import PartitionTracker

log = logging.getLogger("shunter.message")

# A header value is None when the producer sent a null value (Kafka allows it).
Headers = Sequence[tuple[str, bytes | None]]


T = TypeVar("T")

# Records whose headers could not be read, by coordinates. A header name that is not
# UTF-8 makes confluent-kafka's ``Message.headers()`` return a half-built list *with an
# exception set*: called from C that is raised at once (SystemError), but a call site
# the interpreter has specialised (CPython 3.11) returns the broken list and leaves the
# exception to surface at some later call; iterating that list crashes the interpreter.
# So headers are read only here, through ``methodcaller`` (a call from C, whose result
# is always checked), and never again once a read failed: the next call hands out the
# cached broken list without any exception.
_UNREADABLE: set[tuple[str, int, int]] = set()
_UNREADABLE_MAX = 10_000
_HEADERS = operator.methodcaller("headers")


def read_headers(kmsg: KafkaRecord) -> Headers | None:
    """The record's headers; ``UnreadableHeadersError`` if they cannot be read (ever again)."""
    if _UNREADABLE and (kmsg.topic(), kmsg.partition(), kmsg.offset()) in _UNREADABLE:
        raise UnreadableHeadersError("its headers could not be read (an earlier attempt failed)")
    try:
        headers: Headers | None = _HEADERS(kmsg)
        return headers
    except Exception as exc:
        if len(_UNREADABLE) >= _UNREADABLE_MAX:
            _UNREADABLE.clear()
        _UNREADABLE.add((kmsg.topic(), kmsg.partition(), kmsg.offset()))
        raise UnreadableHeadersError(
            f"its headers cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def _read(read: Callable[[], T], default: T) -> T:
    try:
        return read()
    except Exception:  # what a hostile record makes unreadable is left out
        return default


class KafkaRecord(Protocol):
    """What shunter reads of a consumed record (a confluent-kafka ``Message``).

    Any of the accessors may raise on a record a hostile producer made (``headers()``
    raises on a header name that is not UTF-8): the pipeline reads them inside its
    per-record guard, never outside it, and headers only through ``read_headers``."""

    def error(self) -> KafkaError | None: ...

    def topic(self) -> str: ...

    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def key(self) -> bytes | None: ...

    def value(self) -> bytes | None: ...

    def timestamp(self) -> tuple[int, int]: ...

    def headers(self) -> Headers | None: ...


class Record:
    """A consumed Kafka record after decoding, shared by all its deliveries."""

    __slots__ = (
        "decode",
        "first_failure",
        "headers",
        "key",
        "left",
        "offset",
        "owner",
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
        raw: bytes | None,  # None: a tombstone, which decode rejects
        timestamp: int,
        headers: Headers | None,
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
        # Deliveries not yet settled. The tracker holds the offset once for all of them:
        # the last one to settle releases it (``settle_one``).
        self.left = 1
        # Delivered to several subscribers: the caller whose delivery gets ``value`` itself
        # (a name, not the Message: a reference back would make every record a cycle
        # for the garbage collector), and how the others get a copy of their own
        # (``copy_value``). None: one delivery, or the value is shared as is.
        self.owner: str | None = None
        self.decode: Callable[[bytes | None], Any] | None = None

    def copy_value(self) -> Any:
        """The decoded value again, for another subscriber's delivery: decoded anew from
        the payload (the same decoder, so the same value), else a deep copy."""
        if self.decode is not None:
            try:
                return self.decode(self.raw)
            except Exception:  # e.g. a schema registry gone since: copy what was decoded
                log.debug("decoding %s[%d]@%d again failed; copying it", self.topic,
                          self.partition, self.offset, exc_info=True)
        return copy.deepcopy(self.value)

    @classmethod
    def from_kafka(cls, kmsg: KafkaRecord, ptrack: PartitionTracker) -> Record:
        """The record as consumed: its own coordinates, key, payload and headers.
        ``ptrack`` is the tracker of the partition it was consumed from."""
        offset = kmsg.offset()
        topic, partition = ptrack.tp
        return cls(
            topic,
            partition,
            offset,
            kmsg.key(),
            kmsg.value(),
            kmsg.timestamp()[1],
            read_headers(kmsg),
            ptrack,
            offset,
        )

    @classmethod
    def bare(cls, kmsg: KafkaRecord, ptrack: PartitionTracker) -> Record:
        """The record with whatever of it can be read: for dead-lettering a record whose
        reading failed. Coordinates always read; key, payload and headers may be lost."""
        offset = kmsg.offset()
        return cls(
            kmsg.topic(),
            kmsg.partition(),
            offset,
            _read(kmsg.key, None),
            _read(kmsg.value, None),
            _read(lambda: kmsg.timestamp()[1], 0),
            _read(lambda: read_headers(kmsg), None),
            ptrack,
            offset,
        )

    def settle_one(self) -> None:
        """One of this record's deliveries is settled; the last one releases its offset."""
        self.left -= 1
        if not self.left:
            self.ptrack.release(self.seq)


class Message:
    """One record as delivered to one subscriber.

    ``topic``/``partition``/``offset``/``timestamp`` are the record's origin: for a
    delivery read back from a retry tier they still name the source topic, so a handler
    sees the same message on every attempt. ``attempt`` starts at 1.

    Read-only, as everything a handler is given of it: ``caller``, ``category`` and
    ``attempt`` say where a failed delivery goes next (the retry tier, the dead-letter
    topic) and whose it is, so a handler that assigned them and then failed would send
    its delivery nowhere. Assigning one raises AttributeError in the handler.
    """

    __slots__ = ("_attempt", "_caller", "_category", "_own", "_record")

    _own: Any  # this delivery's copy of the value, once read (see ``value``)

    def __init__(self, record: Record, caller: str, category: str, attempt: int = 1) -> None:
        self._record = record
        self._caller = caller
        self._category = category
        self._attempt = attempt

    @property
    def caller(self) -> str:
        return self._caller

    @property
    def category(self) -> str:
        return self._category

    @property
    def attempt(self) -> int:
        return self._attempt

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
    def headers(self) -> Headers:
        """The record's own headers in order; a null header value is None. A list of
        this call's own: what a handler does to it changes nothing else."""
        return list(self._record.headers or ())

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch, as Kafka stamped the record."""
        return self._record.timestamp

    @property
    def value(self) -> Any:
        """The decoded (and validated) value, this delivery's own: subscribers are
        isolated, so what one handler does to its value no other one sees. Of a record
        delivered to several subscribers, one delivery gets the value decoded at intake;
        another that reads it gets its own copy, decoded again from the payload on its
        first read (``Record.copy_value``)."""
        record = self._record
        owner = record.owner
        if owner is None or owner == self._caller:  # callers are unique in a configuration
            return record.value
        try:
            return self._own
        except AttributeError:
            own = self._own = record.copy_value()
            return own

    @property
    def raw(self) -> bytes:
        """The payload bytes exactly as they were on the source topic."""
        raw = self._record.raw
        return b"" if raw is None else raw  # None: a tombstone, which never reaches a handler

    def header(self, name: str) -> bytes | None:
        """The last header called ``name``, or None."""
        found = None
        for key, value in self._record.headers or ():
            if key == name:
                found = value
        return found

    def __repr__(self) -> str:
        return (
            f"Message({self.topic}[{self.partition}]@{self.offset}, caller={self.caller!r}, "
            f"category={self.category!r}, attempt={self.attempt})"
        )


_new = object.__new__
try:
    _new(Message)
    _NATIVE = False
except TypeError:  # compiled by mypyc (setup.py): its constructor is a C call, no frame
    _NATIVE = True


# -- reading a consumed record on every record's path ------------------------------------
#
# Compiled, ``kmsg.topic()`` looks ``topic`` up on the record's type by name at each call
# (the interpreter caches that lookup at the call site, compiled code does not): over the
# ten reads of every record's path, some 2,000 instructions a record. These call
# confluent-kafka's own accessors on its ``Message`` directly, and read any other record
# (a test's stand-in) by name. Interpreted, the by-name call is the cheaper one, so there
# they are bound to method callers instead (below). Headers are never read here, only by
# ``read_headers``.
_KAFKA_MESSAGE: Final[Any] = confluent_kafka.Message
_ERROR: Final[Any] = confluent_kafka.Message.error
_TOPIC: Final[Any] = confluent_kafka.Message.topic
_PARTITION: Final[Any] = confluent_kafka.Message.partition
_OFFSET: Final[Any] = confluent_kafka.Message.offset
_KEY: Final[Any] = confluent_kafka.Message.key
_VALUE: Final[Any] = confluent_kafka.Message.value
_TIMESTAMP: Final[Any] = confluent_kafka.Message.timestamp


def error_of(kmsg: KafkaRecord) -> KafkaError | None:
    return _ERROR(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.error()


def topic_of(kmsg: KafkaRecord) -> str:
    return _TOPIC(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.topic()


def partition_of(kmsg: KafkaRecord) -> int:
    return _PARTITION(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.partition()


def offset_of(kmsg: KafkaRecord) -> int:
    return _OFFSET(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.offset()


def key_of(kmsg: KafkaRecord) -> bytes | None:
    return _KEY(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.key()


def value_of(kmsg: KafkaRecord) -> bytes | None:
    return _VALUE(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.value()


def timestamp_of(kmsg: KafkaRecord) -> tuple[int, int]:
    return _TIMESTAMP(kmsg) if type(kmsg) is _KAFKA_MESSAGE else kmsg.timestamp()


if not _NATIVE:  # interpreted (see above)
    error_of = operator.methodcaller("error")  # type: ignore[assignment]
    topic_of = operator.methodcaller("topic")  # type: ignore[assignment]
    partition_of = operator.methodcaller("partition")  # type: ignore[assignment]
    offset_of = operator.methodcaller("offset")  # type: ignore[assignment]
    key_of = operator.methodcaller("key")  # type: ignore[assignment]
    value_of = operator.methodcaller("value")  # type: ignore[assignment]
    timestamp_of = operator.methodcaller("timestamp")  # type: ignore[assignment]


def deliveries(record: Record, pairs: list[tuple[str, str]]) -> list[Message]:
    """A first attempt's ``Message`` for each (caller, category) of ``record``: every
    record's path, so built without a call of ``Message.__init__`` per delivery (a frame
    each: about a third of their cost) unless compiled, when the constructor is cheaper."""
    if _NATIVE:
        return [Message(record, caller, category) for caller, category in pairs]
    out = []
    for caller, category in pairs:
        msg = _new(Message)
        msg._record = record
        msg._caller = caller
        msg._category = category
        msg._attempt = 1
        out.append(msg)
    return out
