"""The benchmark's data: live-revenue gift events, their JSON Schema, and producing them.

Events are ~200 bytes of JSON keyed by user, the way a live-streaming platform's gift
topic looks: a few heavy spenders send a large share of the gifts, most users send a few.
Generation is seeded, so every run of every scenario reads the same stream.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

GIFT_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["event_id", "user_id", "room_id", "anchor_id", "gift_id", "count", "price", "ts"],
    "properties": {
        "event_id": {"type": "string", "minLength": 1},
        "user_id": {"type": "integer", "minimum": 1},
        "room_id": {"type": "integer", "minimum": 1},
        "anchor_id": {"type": "integer", "minimum": 1},
        "gift_id": {"type": "integer", "minimum": 1},
        "gift_name": {"type": "string"},
        "count": {"type": "integer", "minimum": 1},
        "price": {"type": "integer", "minimum": 0},
        "currency": {"enum": ["coin", "diamond"]},
        "combo": {"type": "integer", "minimum": 0},
        "platform": {"enum": ["ios", "android", "web"]},
        "ts": {"type": "integer"},
    },
}

_GIFTS = [
    (1, "rose", 1),
    (7, "heart", 10),
    (12, "lollipop", 5),
    (23, "sports-car", 1200),
    (31, "rocket", 5000),
    (44, "castle", 20000),
    (58, "crown", 800),
    (63, "kiss", 2),
]
_PLATFORMS = ["ios", "android", "web"]


def gift_events(count: int, users: int, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """``count`` (key, JSON value) pairs; keys are ``users`` user ids, skewed to a few."""
    rng = random.Random(seed)
    ts = 1_735_689_600_000
    for n in range(count):
        # Pareto-like: one user in ten sends about half of the gifts.
        user = 100_000 + (int(users * rng.random() ** 3) if n % 2 else rng.randrange(users))
        gift_id, name, price = _GIFTS[rng.randrange(len(_GIFTS))]
        qty = rng.choice((1, 1, 1, 1, 5, 10, 99))
        ts += rng.randrange(0, 20)
        event = {
            "event_id": f"g-{seed:02d}-{n:012d}",
            "user_id": user,
            "room_id": 5_000_000 + rng.randrange(2_000),
            "anchor_id": 9_000_000 + rng.randrange(2_000),
            "gift_id": gift_id,
            "gift_name": name,
            "count": qty,
            "price": price * qty,
            "currency": "coin",
            "combo": rng.randrange(0, 30),
            "platform": _PLATFORMS[rng.randrange(3)],
            "ts": ts,
        }
        yield str(user).encode(), orjson.dumps(event)


def round_robin_keys(count: int, keys: int) -> Iterator[tuple[bytes, bytes]]:
    """Gift events whose keys cycle through exactly ``keys`` users (for lane-bound runs)."""
    for n, (_key, value) in enumerate(gift_events(count, keys)):
        yield f"user-{n % keys}".encode(), value


def produce(bootstrap: str, topic: str, records: Iterator[tuple[bytes, bytes]]) -> dict[int, int]:
    """Write every record and wait for the broker; returns partition -> end offset.

    The ends come from the delivery reports, not from the broker's watermarks: the
    embedded broker (Tansu) reports the last *batch*'s base offset + 1 as high watermark.
    """
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "acks": "all",
        }
    )
    failures: list[str] = []
    ends: dict[int, int] = {}

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        elif msg.offset() >= ends.get(msg.partition(), 0):
            ends[msg.partition()] = msg.offset() + 1

    for written, (key, value) in enumerate(records, 1):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        if written % 5000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(
            f"producing to {topic} failed: {left} unacknowledged, "
            f"{len(failures)} errors ({failures[:1]})"
        )
    return ends


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Best effort: remove what the bench created on a broker that outlives it."""
    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(Exception):  # already gone, or a broker that refuses
            future.result(30)
