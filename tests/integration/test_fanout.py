"""Given messages on several topics, when shunter runs, then every subscriber of each
message's categories receives it once, filters decide membership, and offsets are
committed to the end."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

import shunter
from kafkatools import Broker, config
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka


def test_fanout_to_every_subscriber_of_each_category(broker: Broker, unique: str) -> None:
    gift, lottery, guard = f"gift-{unique}", f"lottery-{unique}", f"guard-{unique}"
    broker.create({gift: 3, lottery: 2, guard: 2})
    app = shunter.Dispatcher(config(
        broker, f"g-{unique}",
        topics={gift: {}, lottery: {}, guard: {}},
        categories={
            "revenue": {"topics": [gift, lottery]},
            "guard": {"topics": [guard], "where": "value.type == 'buy'"},
            "big": {"topics": [gift, guard], "where": "value.price >= 100"},
        },
        subscribers=[],
    ))
    seen: Counter[tuple[str, str, int]] = Counter()
    lock = threading.Lock()

    def recorder(caller: str):  # type: ignore[no-untyped-def]
        async def handler(msg: shunter.Message) -> None:
            with lock:
                seen[(caller, msg.topic, msg.value["n"])] += 1
        return handler

    for caller, category in [("medal", "revenue"), ("rank", "revenue"), ("task", "guard"),
                             ("vip", "big")]:
        app.subscriber(category, caller=caller)(recorder(caller))

    broker.produce(gift, [{"n": i, "price": i} for i in range(200)], key=lambda i, v: f"u{i % 7}")
    broker.produce(lottery, [{"n": i} for i in range(100)])
    broker.produce(guard, [{"n": i, "type": "buy" if i % 2 else "renew", "price": 150}
                           for i in range(50)])
    expected = (200 + 100) * 2 + 25 + (100 + 50)
    with DispatcherThread(app) as running:
        running.wait_for(lambda: sum(seen.values()) >= expected)
    assert sum(seen.values()) == expected
    assert all(n == 1 for n in seen.values()), "a subscriber got a message twice"
    assert {n for (c, t, n) in seen if c == "task"} == set(range(1, 50, 2))
    assert {n for (c, t, n) in seen if c == "vip" and t == gift} == set(range(100, 200))
    committed = [max(o, 0) for o in broker.committed(f"g-{unique}", gift, 3)]  # -1001: none
    assert committed == _ends(broker, gift, 3)


def _ends(broker: Broker, topic: str, partitions: int) -> list[int]:
    counts = Counter(m.partition() for m in broker.read_all(topic))
    return [counts[p] for p in range(partitions)]
