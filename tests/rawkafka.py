"""A tiny librdkafka producer and reader through ctypes, for records Python cannot make.

confluent-kafka's ``Producer.produce`` accepts only ``str`` header names, and its
``Message.headers()`` raises on a name that is not UTF-8. A hostile producer is under no
such rule: the wire format allows any bytes as a header name, a null header value, a
null or empty key, any timestamp. ``RawProducer`` produces exactly such records through
``rd_kafka_produceva`` of the librdkafka that ships inside the confluent-kafka wheel (the
one already loaded in this process), with a delivery report per record, so a test knows
each record landed and at which offset. ``read_raw`` reads a topic back with every header
as bytes.

Layouts and constants follow librdkafka's ``src/rdkafka.h`` (stable since 1.0): the
``rd_kafka_vtype_t`` enum, the ``rd_kafka_vu_t`` union (64 bytes of padding), and
``rd_kafka_message_t``. Headers are built with ``rd_kafka_header_add`` with explicit name
lengths and passed as one ``RD_KAFKA_VTYPE_HEADERS`` list (``RD_KAFKA_VTYPE_HEADER``
takes a NUL-terminated name, which could not carry a NUL byte).

>>> with RawProducer("127.0.0.1:9092") as producer:
...     coords = producer.produce_all("t", [RawRecord(b"v", headers=[(b"\\xff", None)])])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- librdkafka: the copy the confluent-kafka wheel ships -------------------------------------

RD_KAFKA_PRODUCER = 0
RD_KAFKA_CONSUMER = 1
RD_KAFKA_CONF_OK = 0
RD_KAFKA_PARTITION_UA = -1
RD_KAFKA_OFFSET_BEGINNING = -2
RD_KAFKA_MSG_F_COPY = 0x2

# rd_kafka_vtype_t
VTYPE_END = 0
VTYPE_TOPIC = 1
VTYPE_RKT = 2
VTYPE_PARTITION = 3
VTYPE_VALUE = 4
VTYPE_KEY = 5
VTYPE_OPAQUE = 6
VTYPE_MSGFLAGS = 7
VTYPE_TIMESTAMP = 8
VTYPE_HEADER = 9
VTYPE_HEADERS = 10

ERR_NO_ERROR = 0
ERR__PARTITION_EOF = -191
ERR__QUEUE_FULL = -184


class _Mem(ctypes.Structure):
    _fields_ = (("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t))


class _Header(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char_p), ("val", ctypes.c_void_p), ("size", ctypes.c_ssize_t))


class _VuUnion(ctypes.Union):
    _fields_ = (
        ("cstr", ctypes.c_char_p),
        ("rkt", ctypes.c_void_p),
        ("i", ctypes.c_int),
        ("i32", ctypes.c_int32),
        ("i64", ctypes.c_int64),
        ("mem", _Mem),
        ("header", _Header),
        ("headers", ctypes.c_void_p),
        ("ptr", ctypes.c_void_p),
        ("_pad", ctypes.c_char * 64),
    )


class _Vu(ctypes.Structure):
    """``rd_kafka_vu_t``: a vtype and its argument."""

    _fields_ = (("vtype", ctypes.c_int), ("u", _VuUnion))


class _Message(ctypes.Structure):
    """``rd_kafka_message_t``."""

    _fields_ = (
        ("err", ctypes.c_int),
        ("rkt", ctypes.c_void_p),
        ("partition", ctypes.c_int32),
        ("payload", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
        ("key", ctypes.c_void_p),
        ("key_len", ctypes.c_size_t),
        ("offset", ctypes.c_int64),
        ("_private", ctypes.c_void_p),
    )


_DR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)

_lib_lock = threading.Lock()
_lib_handle: ctypes.CDLL | None = None


def library_path() -> str:
    """The librdkafka that confluent-kafka's ``cimpl`` loaded (or, failing that, the one
    in ``confluent_kafka.libs``, or the system's)."""
    import confluent_kafka.cimpl

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "librdkafka" in os.path.basename(path):
                    return path
    except OSError:
        pass
    import confluent_kafka

    libs = os.path.join(
        os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs"
    )
    found = sorted(glob.glob(os.path.join(libs, "librdkafka*.so*")))
    if found:
        return found[0]
    system = ctypes.util.find_library("rdkafka")
    if system is None:
        raise OSError("librdkafka not found next to confluent_kafka nor on the system")
    return system


def lib() -> ctypes.CDLL:
    """librdkafka with the prototypes this module uses declared."""
    global _lib_handle
    with _lib_lock:
        if _lib_handle is None:
            _lib_handle = _declare(ctypes.CDLL(library_path()))
        return _lib_handle


def _declare(so: ctypes.CDLL) -> ctypes.CDLL:
    vp, cp, sz, i32, i64 = (
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_int32,
        ctypes.c_int64,
    )
    protos: dict[str, tuple[Any, list[Any]]] = {
        "rd_kafka_version": (ctypes.c_int, []),
        "rd_kafka_version_str": (cp, []),
        "rd_kafka_conf_new": (vp, []),
        "rd_kafka_conf_destroy": (None, [vp]),
        "rd_kafka_conf_set": (ctypes.c_int, [vp, cp, cp, cp, sz]),
        "rd_kafka_conf_set_dr_msg_cb": (None, [vp, _DR_CB]),
        "rd_kafka_new": (vp, [ctypes.c_int, vp, cp, sz]),
        "rd_kafka_destroy": (None, [vp]),
        "rd_kafka_produceva": (vp, [vp, ctypes.POINTER(_Vu), sz]),
        "rd_kafka_error_code": (ctypes.c_int, [vp]),
        "rd_kafka_error_string": (cp, [vp]),
        "rd_kafka_error_destroy": (None, [vp]),
        "rd_kafka_err2str": (cp, [ctypes.c_int]),
        "rd_kafka_poll": (ctypes.c_int, [vp, ctypes.c_int]),
        "rd_kafka_flush": (ctypes.c_int, [vp, ctypes.c_int]),
        "rd_kafka_outq_len": (ctypes.c_int, [vp]),
        "rd_kafka_headers_new": (vp, [sz]),
        "rd_kafka_headers_destroy": (None, [vp]),
        "rd_kafka_header_add": (ctypes.c_int, [vp, vp, ctypes.c_ssize_t, vp, ctypes.c_ssize_t]),
        "rd_kafka_header_get_all": (
            ctypes.c_int,
            [vp, sz, ctypes.POINTER(cp), ctypes.POINTER(vp), ctypes.POINTER(sz)],
        ),
        "rd_kafka_topic_partition_list_new": (vp, [ctypes.c_int]),
        "rd_kafka_topic_partition_list_destroy": (None, [vp]),
        "rd_kafka_topic_partition_list_add": (vp, [vp, cp, i32]),
        "rd_kafka_topic_partition_list_set_offset": (ctypes.c_int, [vp, cp, i32, i64]),
        "rd_kafka_assign": (ctypes.c_int, [vp, vp]),
        "rd_kafka_consumer_poll": (ctypes.POINTER(_Message), [vp, ctypes.c_int]),
        "rd_kafka_consumer_close": (ctypes.c_int, [vp]),
        "rd_kafka_message_destroy": (None, [ctypes.POINTER(_Message)]),
        "rd_kafka_message_headers": (ctypes.c_int, [ctypes.POINTER(_Message), ctypes.POINTER(vp)]),
        "rd_kafka_message_timestamp": (
            i64,
            [ctypes.POINTER(_Message), ctypes.POINTER(ctypes.c_int)],
        ),
        "rd_kafka_topic_name": (cp, [vp]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(so, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return so


def version() -> str:
    """The loaded librdkafka's version string."""
    return (lib().rd_kafka_version_str() or b"?").decode()


def _new_client(kind: int, settings: dict[str, Any], dr_cb: Any = None) -> ctypes.c_void_p:
    so = lib()
    conf = so.rd_kafka_conf_new()
    errstr = ctypes.create_string_buffer(512)
    for name, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        rc = so.rd_kafka_conf_set(conf, name.encode(), text.encode(), errstr, len(errstr))
        if rc != RD_KAFKA_CONF_OK:
            so.rd_kafka_conf_destroy(conf)
            raise ValueError(f"librdkafka refused {name}={text}: {errstr.value.decode()}")
    if dr_cb is not None:
        so.rd_kafka_conf_set_dr_msg_cb(conf, dr_cb)
    rk = so.rd_kafka_new(kind, conf, errstr, len(errstr))  # owns conf on success
    if not rk:
        so.rd_kafka_conf_destroy(conf)
        raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
    return ctypes.c_void_p(rk)


def _err2str(code: int) -> str:
    return (lib().rd_kafka_err2str(code) or b"").decode("utf-8", "replace")


# -- producing ----------------------------------------------------------------------------


Header = tuple[bytes | str, bytes | str | None]


def _b(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


@dataclass(frozen=True)
class RawRecord:
    """One record as a hostile producer may write it.

    ``value``/``key``: bytes, or None for a null (a null value is a tombstone).
    ``headers``: (name, value) pairs in order; names any bytes, values bytes or None.
    ``timestamp``: ms since the epoch; 0 means "now" (librdkafka's rule), negative
    values are sent as they are. ``partition``: -1 lets the partitioner choose.
    """

    value: bytes | None = None
    key: bytes | None = None
    headers: Sequence[Header] = ()
    timestamp: int = 0
    partition: int = RD_KAFKA_PARTITION_UA


@dataclass
class Delivery:
    """The delivery report of one record: where it landed, or why not."""

    partition: int = -1
    offset: int = -1
    error: str = ""
    done: bool = False


class ProduceError(RuntimeError):
    pass


class RawProducer:
    """A librdkafka producer driven through ``rd_kafka_produceva``.

    ``produce`` enqueues one record and returns its index; ``flush`` waits for every
    delivery report; ``deliveries[i]`` says where record ``i`` landed. Not thread-safe:
    use one per thread.
    """

    def __init__(self, bootstrap: str, **settings: Any) -> None:
        self.deliveries: list[Delivery] = []
        self._cb = _DR_CB(self._on_delivery)  # kept referenced as long as the client lives
        config = {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "enable.idempotence": True,
            "log_level": 3,
            **settings,
        }
        self._rk: ctypes.c_void_p | None = _new_client(RD_KAFKA_PRODUCER, config, self._cb)

    def _on_delivery(self, _rk: Any, rkmessage: Any, _opaque: Any) -> None:
        msg = rkmessage.contents
        index = msg._private or 0
        report = self.deliveries[index - 1]  # opaque is index + 1 (NULL is not an index)
        report.done = True
        if msg.err != ERR_NO_ERROR:
            report.error = f"{_err2str(msg.err)} ({msg.err})"
        else:
            report.partition, report.offset = msg.partition, msg.offset

    def produce(self, topic: str, record: RawRecord, block: float = 60.0) -> int:
        """Enqueue ``record`` for ``topic``; return its index in ``deliveries``. Waits (up
        to ``block`` s) while librdkafka's queue is full; ProduceError when refused."""
        assert self._rk is not None, "closed"
        so = lib()
        self.deliveries.append(Delivery())
        index = len(self.deliveries)
        keep: list[Any] = []  # Python buffers referenced by the vu array during the call

        def mem(data: bytes | None) -> _Mem:
            if data is None:
                return _Mem(None, 0)
            buf = ctypes.create_string_buffer(data, len(data) or 1)
            keep.append(buf)
            return _Mem(ctypes.cast(buf, ctypes.c_void_p), len(data))

        hdrs = so.rd_kafka_headers_new(max(len(record.headers), 1))
        for name, value in record.headers:
            raw_name = mem(_b(name))
            if value is None:
                so.rd_kafka_header_add(hdrs, raw_name.ptr, raw_name.size, None, -1)
            else:
                raw_value = mem(_b(value))
                so.rd_kafka_header_add(
                    hdrs, raw_name.ptr, raw_name.size, raw_value.ptr, raw_value.size
                )
        vus = (_Vu * 7)()
        vus[0].vtype, vus[0].u.cstr = VTYPE_TOPIC, topic.encode()
        vus[1].vtype, vus[1].u.i32 = VTYPE_PARTITION, record.partition
        vus[2].vtype, vus[2].u.mem = VTYPE_VALUE, mem(record.value)
        vus[3].vtype, vus[3].u.mem = VTYPE_KEY, mem(record.key)
        vus[4].vtype, vus[4].u.i = VTYPE_MSGFLAGS, RD_KAFKA_MSG_F_COPY
        vus[5].vtype, vus[5].u.ptr = VTYPE_OPAQUE, index
        vus[6].vtype, vus[6].u.i64 = VTYPE_TIMESTAMP, record.timestamp
        headers_vu = _Vu()
        headers_vu.vtype, headers_vu.u.headers = VTYPE_HEADERS, hdrs
        args = (_Vu * 8)(*vus, headers_vu)
        deadline = time.monotonic() + block
        while True:
            error = so.rd_kafka_produceva(self._rk, args, len(args))
            if not error:
                return index - 1  # the headers now belong to the message
            code = so.rd_kafka_error_code(error)
            text = (so.rd_kafka_error_string(error) or b"").decode("utf-8", "replace")
            so.rd_kafka_error_destroy(error)
            if code == ERR__QUEUE_FULL and time.monotonic() < deadline:
                so.rd_kafka_poll(self._rk, 100)
                continue
            so.rd_kafka_headers_destroy(hdrs)  # still ours when produceva refuses
            self.deliveries[index - 1] = Delivery(error=text, done=True)
            raise ProduceError(f"rd_kafka_produceva refused a record for {topic}: {text}")

    def poll(self, timeout: float = 0.0) -> int:
        assert self._rk is not None, "closed"
        return int(lib().rd_kafka_poll(self._rk, int(timeout * 1000)))

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every delivery report; ProduceError if any record failed or is unsent."""
        assert self._rk is not None, "closed"
        left = lib().rd_kafka_flush(self._rk, int(timeout * 1000))
        lib().rd_kafka_poll(self._rk, 0)  # serve reports of what the flush completed
        failed = [(i, d.error) for i, d in enumerate(self.deliveries) if d.error]
        pending = sum(1 for d in self.deliveries if not d.done)
        if left or failed or pending:
            raise ProduceError(
                f"{pending} records unacknowledged after {timeout:.0f}s, "
                f"{len(failed)} failed: {failed[:3]}"
            )

    def produce_all(
        self, topic: str, records: Iterable[RawRecord], timeout: float = 60.0
    ) -> list[tuple[int, int]]:
        """Produce ``records`` in order, wait for all; return each one's (partition, offset)."""
        first = len(self.deliveries)
        for n, record in enumerate(records):
            self.produce(topic, record)
            if n % 100 == 0:
                self.poll(0)
        self.flush(timeout)
        return [(d.partition, d.offset) for d in self.deliveries[first:]]

    def close(self) -> None:
        if self._rk is not None:
            so = lib()
            so.rd_kafka_flush(self._rk, 10_000)
            so.rd_kafka_destroy(self._rk)
            self._rk = None

    def __enter__(self) -> RawProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def produce_raw(
    bootstrap: str,
    topic: str,
    records: Iterable[RawRecord],
    timeout: float = 60.0,
    **settings: Any,
) -> list[tuple[int, int]]:
    """Produce ``records`` to ``topic`` in order; return each one's (partition, offset)."""
    with RawProducer(bootstrap, **settings) as producer:
        return producer.produce_all(topic, records, timeout)


# -- reading back, headers as bytes -------------------------------------------------------


@dataclass(frozen=True)
class ReadRecord:
    """A record read back: every field as librdkafka handed it over (header names as
    bytes, cut at a NUL byte: librdkafka's header getter has no name length)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    timestamp_type: int  # 0 not available, 1 create time, 2 log append time
    headers: list[tuple[bytes, bytes | None]] = field(default_factory=list)

    def header(self, name: bytes | str) -> bytes | None:
        """The last value of header ``name`` (None if absent or null)."""
        want = _b(name)
        found = None
        for key, value in self.headers:
            if key == want:
                found = value
        return found

    def text(self, name: bytes | str) -> str | None:
        """The last value of header ``name`` as text (None if absent or null)."""
        value = self.header(name)
        return None if value is None else value.decode("utf-8", "replace")

    def has(self, name: bytes | str) -> bool:
        want = _b(name)
        return any(key == want for key, _ in self.headers)


def _copy(ptr: int | None, size: int) -> bytes | None:
    if not ptr:
        return None
    return ctypes.string_at(ptr, size)


def read_raw(
    bootstrap: str,
    topic: str,
    partitions: int | Iterable[int],
    timeout: float = 60.0,
    **settings: Any,
) -> list[ReadRecord]:
    """Every record of ``topic``'s ``partitions`` (a count or the numbers) from the start
    to the end seen at reading time. TimeoutError if the end is not reached in time."""
    numbers = list(range(partitions)) if isinstance(partitions, int) else list(partitions)
    so = lib()
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": f"rawkafka-reader-{os.getpid()}-{time.time_ns()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "log_level": 3,
        **settings,
    }
    rk = _new_client(RD_KAFKA_CONSUMER, config)
    out: list[ReadRecord] = []
    try:
        tps = so.rd_kafka_topic_partition_list_new(len(numbers) or 1)
        for p in numbers:
            so.rd_kafka_topic_partition_list_add(tps, topic.encode(), p)
            so.rd_kafka_topic_partition_list_set_offset(
                tps, topic.encode(), p, RD_KAFKA_OFFSET_BEGINNING
            )
        err = so.rd_kafka_assign(rk, tps)
        so.rd_kafka_topic_partition_list_destroy(tps)
        if err:
            raise RuntimeError(f"assign failed: {_err2str(err)}")
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(numbers):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic}: partitions {sorted(set(numbers) - eof)} not at their "
                    f"end after {timeout:.0f}s"
                )
            msgp = so.rd_kafka_consumer_poll(rk, 200)
            if not msgp:
                continue
            try:
                msg = msgp.contents
                if msg.err == ERR__PARTITION_EOF:
                    eof.add(msg.partition)
                    continue
                if msg.err != ERR_NO_ERROR:
                    continue  # transient consumer errors: the poll goes on
                eof.discard(msg.partition)
                out.append(_read_record(so, msgp))
            finally:
                so.rd_kafka_message_destroy(msgp)
    finally:
        so.rd_kafka_consumer_close(rk)
        so.rd_kafka_destroy(rk)
    out.sort(key=lambda r: (r.partition, r.offset))
    return out


def _read_record(so: ctypes.CDLL, msgp: Any) -> ReadRecord:
    msg = msgp.contents
    tstype = ctypes.c_int(0)
    timestamp = so.rd_kafka_message_timestamp(msgp, ctypes.byref(tstype))
    headers: list[tuple[bytes, bytes | None]] = []
    hdrs = ctypes.c_void_p()
    if so.rd_kafka_message_headers(msgp, ctypes.byref(hdrs)) == ERR_NO_ERROR and hdrs:
        idx = 0
        name = ctypes.c_char_p()
        value = ctypes.c_void_p()
        size = ctypes.c_size_t()
        while (
            so.rd_kafka_header_get_all(
                hdrs, idx, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)
            )
            == ERR_NO_ERROR
        ):
            headers.append((name.value or b"", _copy(value.value, size.value)))
            idx += 1
    return ReadRecord(
        topic=(so.rd_kafka_topic_name(msg.rkt) or b"").decode("utf-8", "replace"),
        partition=msg.partition,
        offset=msg.offset,
        key=_copy(msg.key, msg.key_len),
        value=_copy(msg.payload, msg.len),
        timestamp=timestamp,
        timestamp_type=tstype.value,
        headers=headers,
    )
