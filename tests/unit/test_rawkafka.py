"""The test producer ``rawkafka`` against a real broker: what it writes is on the topic,
byte for byte, where its delivery reports say; what it cannot write is refused loudly."""

from __future__ import annotations

import ctypes

import pytest
import rawkafka
from confluent_kafka import Consumer, TopicPartition
from rawkafka import ProduceError, RawProducer, RawRecord, read_raw

from kafkatools import Broker
from shunter.broker.admin import ensure_topics

FAR_FUTURE = 4_102_444_800_000  # 2100-01-01
# Apache Kafka 4 refuses timestamps more than an hour ahead unless the topic allows them.
ANY_TIMESTAMP = {"message.timestamp.after.max.ms": str(2**63 - 1)}


def test_the_ctypes_layouts_match_rdkafka_h() -> None:
    """rd_kafka_vu_t is an int and a 64-byte union aligned to 8; rd_kafka_message_t is
    nine fields ending in an 8-byte pointer (src/rdkafka.h, unchanged since 1.0)."""
    assert ctypes.sizeof(rawkafka._VuUnion) == 64
    assert ctypes.sizeof(rawkafka._Vu) == 72
    assert rawkafka._Vu.u.offset == 8
    assert rawkafka._Message.offset.offset == 56 and ctypes.sizeof(rawkafka._Message) == 72
    assert rawkafka.version().startswith("2.")


@pytest.mark.kafka
def test_hostile_records_land_byte_for_byte_where_the_reports_say(
    broker: Broker, unique: str
) -> None:
    """Given records no Python producer can write (a header name that is not UTF-8, a null
    header value, duplicate and empty header names, null vs empty key and value, a
    600 KB key, timestamps -1, 1 and far in the future),
    when rawkafka produces them to a 2-partition topic, then each delivery report gives
    a distinct (partition, offset), and reading them back finds every field unchanged;
    the Python consumer's ``headers()`` raises on the non-UTF-8 name (issue 10, case 1)."""
    topic = f"raw-{unique}"
    ensure_topics(
        {"bootstrap.servers": broker.bootstrap},
        {topic: 2},
        configs={topic: {**ANY_TIMESTAMP, "max.message.bytes": "2000000"}},
    )
    big_key = bytes(range(256)) * 2400  # 614,400 bytes
    records = [
        RawRecord(b'{"n": 0}', b"k0", [(b"\xff\xfe bad", b"x"), ("ok", b"1")], partition=0),
        RawRecord(b'{"n": 1}', None, [("nul", None), ("", b""), ("d", b"1"), ("d", b"2")]),
        RawRecord(None, b"", [], timestamp=-1, partition=1),
        RawRecord(b"", b"k3", [(b"\xc0\xaf", None)], timestamp=FAR_FUTURE, partition=1),
        RawRecord(b"\x00\x01binary", big_key, [("bin", bytes(range(256)))], timestamp=1),
    ]
    with RawProducer(broker.bootstrap, **{"message.max.bytes": 2_000_000}) as producer:
        coords = producer.produce_all(topic, records)
    assert len(set(coords)) == len(records) and all(o >= 0 for _, o in coords)
    assert coords[0][0] == 0 and coords[2][0] == 1 and coords[3][0] == 1

    back = {(r.partition, r.offset): r for r in read_raw(broker.bootstrap, topic, 2)}
    assert set(back) == set(coords)
    for sent, where in zip(records, coords, strict=True):
        got = back[where]
        assert got.key == sent.key and got.value == sent.value, where
        assert got.headers == [(rawkafka._b(n), v and rawkafka._b(v)) for n, v in sent.headers]
        if sent.timestamp:
            assert got.timestamp == sent.timestamp
    assert back[coords[1]].header("nul") is None and back[coords[1]].has("nul")
    assert back[coords[1]].header("") == b""

    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": f"raw-{unique}", **broker.client}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, coords[0][1])])
        msg = None
        for _ in range(100):
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                break
        assert msg is not None and msg.offset() == coords[0][1]
        with pytest.raises((SystemError, UnicodeDecodeError)):
            msg.headers()
    finally:
        consumer.close()


@pytest.mark.kafka
def test_a_record_librdkafka_refuses_is_an_error_not_a_silent_drop(
    broker: Broker, unique: str
) -> None:
    """Given a producer whose message.max.bytes is 100 KB, when a 200 KB value is
    produced, then produce raises ProduceError naming the size; the record before it
    and the one after it are delivered in order."""
    topic = f"raw-refused-{unique}"
    broker.create({topic: 1})
    with RawProducer(broker.bootstrap, **{"message.max.bytes": 100_000}) as producer:
        producer.produce(topic, RawRecord(b"before"))
        with pytest.raises(ProduceError, match=r"too large|size"):
            producer.produce(topic, RawRecord(b"x" * 200_000))
        producer.produce(topic, RawRecord(b"after"))
        with pytest.raises(ProduceError, match="1 failed"):
            producer.flush(30)
        delivered = [d for d in producer.deliveries if not d.error]
    assert [d.offset for d in delivered] == [0, 1]
    assert [r.value for r in read_raw(broker.bootstrap, topic, 1)] == [b"before", b"after"]
